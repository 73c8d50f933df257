"""Behaviour of the tiny GPT and the classifier: shapes, causality, tying, learning, sampling, padding."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, GPTConfig, padded_vocab, tiny

VOCAB = 50  # padded to 64 inside the model


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(vocab_size=VOCAB)).eval()


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tiny_preset_shape():
    cfg = tiny(vocab_size=VOCAB)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (2, 2, 16, 32)
    assert padded_vocab(VOCAB) == 64 and padded_vocab(64) == 64 and padded_vocab(65) == 128


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="unknown model config keys"):
        GPTConfig.from_dict({**tiny().to_dict(), "n_layers": 3})
    assert GPTConfig.from_dict(tiny(vocab_size=7).to_dict()) == tiny(vocab_size=7)


def test_output_shapes(gpt):
    x = _ids(3, 10)
    logits, loss = gpt(x)
    assert logits.shape == (3, 10, padded_vocab(VOCAB)) and loss is None
    logits, loss = gpt(x, x)
    assert loss.shape == () and torch.isfinite(loss)
    assert gpt.hidden(x).shape == (3, 10, 16)


def test_initial_loss_is_near_uniform(gpt):
    x = _ids(4, 32)
    _, loss = gpt(x, x)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(padded_vocab(VOCAB) * 1.0)).item(), rel=0.05)


def test_ignore_index_excludes_targets(gpt):
    x = _ids(2, 8)
    y = x.clone()
    y[:, 4:] = -1
    _, masked = gpt(x, y)
    logits, _ = gpt(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, logits.size(-1)), x[:, :4].reshape(-1))
    assert_close(masked, expected)


def test_sequence_longer_than_block_is_rejected(gpt):
    with pytest.raises(ValueError, match="block_size"):
        gpt(_ids(1, 33))


def test_causality_future_token_does_not_change_past_logits(gpt):
    x = _ids(2, 20)
    changed = x.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    a, _ = gpt(x)
    b, _ = gpt(changed)
    assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_weight_tying(gpt):
    assert gpt.lm_head.weight is gpt.wte.weight
    n_unique = len({p.data_ptr() for p in gpt.parameters()})
    assert n_unique == len(list(gpt.parameters()))  # parameters() yields the tied tensor once


def test_loss_decreases_on_repeated_batch():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=VOCAB)).train()
    x = _ids(4, 16, seed=1)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_training_is_deterministic_with_a_seed():
    def train() -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(tiny(vocab_size=VOCAB)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = _ids(2, 16, seed=2)
        for _ in range(5):
            _, loss = model(x, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach()

    assert_close(train(), train(), rtol=0, atol=0)


def test_generate_length_and_vocab_range(gpt):
    prompt = _ids(2, 5)
    out = gpt.generate(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(0))  # crosses block_size
    assert out.shape == (2, 45)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.max()) < VOCAB  # never samples a padding slot of the vocabulary


def test_generate_is_deterministic_with_seeded_generator(gpt):
    prompt = _ids(1, 4)
    a = gpt.generate(prompt, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    b = gpt.generate(prompt, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    c = gpt.generate(prompt, 12, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_equals_greedy(gpt):
    prompt = _ids(1, 4)
    greedy = gpt.generate(prompt, 10, temperature=0)
    assert torch.equal(gpt.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)), greedy)


def test_temperature_zero_is_greedy(gpt):
    prompt = _ids(1, 3)
    out = gpt.generate(prompt, 8, temperature=0)
    idx = prompt
    for _ in range(8):
        logits, _ = gpt(idx)
        idx = torch.cat([idx, logits[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_right_padding_does_not_change_logits(pooling):
    torch.manual_seed(0)
    clf = TransformerClassifier(ClassifierConfig(trunk=tiny(vocab_size=VOCAB), labels=["a", "b", "c"], pooling=pooling)).eval()
    torch.nn.init.normal_(clf.head.weight, std=1.0)  # make the logits differ visibly between inputs
    pad = 1
    seqs = [_ids(1, n, seed=n)[0] for n in (5, 11, 20)]
    alone = torch.cat([clf(s[None], torch.tensor([len(s)])) for s in seqs])
    T = 32
    batch = torch.full((len(seqs), T), pad)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])
    padded = clf(batch, lengths)
    assert padded.shape == (3, 3)
    assert_close(padded, alone)
    # and the padding length is what matters: a wrong length changes the answer
    assert not torch.allclose(clf(batch, lengths + 1), alone)


def test_classifier_pooling_modes_differ():
    torch.manual_seed(0)
    trunk = tiny(vocab_size=VOCAB)
    mean = TransformerClassifier(ClassifierConfig(trunk=trunk, labels=["a", "b"], pooling="mean")).eval()
    last = TransformerClassifier(ClassifierConfig(trunk=trunk, labels=["a", "b"], pooling="last")).eval()
    last.load_state_dict(mean.state_dict())
    torch.nn.init.normal_(mean.head.weight, std=1.0)
    last.head.weight.data.copy_(mean.head.weight.data)
    x, n = _ids(2, 10), torch.tensor([10, 6])
    assert not torch.allclose(mean(x, n), last(x, n))


def test_classifier_config_validation():
    with pytest.raises(ValueError, match="pooling"):
        ClassifierConfig(trunk=tiny(), labels=["a", "b"], pooling="max")
    with pytest.raises(ValueError, match="2 labels"):
        ClassifierConfig(trunk=tiny(), labels=["a"])
    cfg = ClassifierConfig(trunk=tiny(vocab_size=9).to_dict(), labels=["a", "b"])
    assert cfg.trunk == tiny(vocab_size=9)
