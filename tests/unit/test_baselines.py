"""The CNN and GRU baselines: shapes, exact right padding, checkpoint round trips, and that they learn."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import checkpoint as ckpt
from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig

VOCAB = 50
LABELS = ["db", "net", "ui"]
LENGTHS = torch.tensor([24, 10, 1, 17])


def make(kind: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "cnn":
        return CNNClassifier(
            CNNConfig(vocab_size=VOCAB, labels=LABELS, n_embd=8, channels=6, kernel_sizes=[2, 3, 5], **kw)
        ).eval()
    return GRUClassifier(GRUConfig(vocab_size=VOCAB, labels=LABELS, n_embd=8, hidden=6, **kw)).eval()


MODELS = [
    ("cnn", {}),
    ("gru", {"pooling": "mean"}),
    ("gru", {"pooling": "last"}),
    ("gru", {"pooling": "mean", "num_layers": 2}),
]
IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}" for k, kw in MODELS]


def batch(T: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (len(LENGTHS), T), generator=g), LENGTHS.clone()


@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_logits_shape(kind, kw):
    ids, n = batch()
    out = make(kind, **kw)(ids, n)
    assert out.shape == (len(LENGTHS), len(LABELS)) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_right_padding_never_changes_logits(kind, kw):
    """Tokens past `lengths`, whatever their ids and however many, do not reach the logits."""
    model = make(kind, **kw)
    ids, n = batch(T=24)
    ref = model(ids, n)
    g = torch.Generator().manual_seed(7)
    longer = torch.cat([ids, torch.randint(VOCAB, (len(n), 16), generator=g)], dim=1)  # (B, 40): garbage tail
    past = torch.arange(longer.size(1))[None, :] >= n[:, None]
    scrambled = torch.where(past, torch.randint(VOCAB, longer.shape, generator=g), longer)
    assert_close(model(longer, n), ref, rtol=1e-5, atol=1e-6)
    assert_close(model(scrambled, n), ref, rtol=1e-5, atol=1e-6)
    trimmed = ids[:, : int(n.max())]
    assert_close(model(trimmed, n), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_real_tokens_do_change_logits(kind, kw):
    """The padding test is not vacuous: editing a real token moves that row's logits, and only that row's."""
    model = make(kind, **kw)
    ids, n = batch()
    edited = ids.clone()
    edited[1, 4] = (ids[1, 4] + 1) % VOCAB  # row 1 has 10 real tokens
    before, after = model(ids, n), model(edited, n)
    assert not torch.allclose(before[1], after[1])
    assert_close(after[[0, 2, 3]], before[[0, 2, 3]], rtol=0, atol=0)


@pytest.mark.parametrize("kind,kw", MODELS, ids=IDS)
def test_save_load_round_trip(tmp_path, kind, kw):
    model = make(kind, **kw)
    ckpt.save_classifier(model, tmp_path / "m", extra={"max_length": 24})
    meta = json.loads((tmp_path / "m" / ckpt.CONFIG).read_text())
    assert meta["kind"] == f"classifier-{kind}" and meta["max_length"] == 24
    assert meta["config"] == model.config.to_dict()
    loaded = ckpt.load_classifier(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training and loaded.config == model.config
    ids, n = batch()
    assert_close(loaded(ids, n), model(ids, n), rtol=0, atol=0)


def test_unknown_kind_is_a_clear_error(tmp_path):
    ckpt.save_classifier(make("cnn"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / ckpt.CONFIG).read_text())
    (tmp_path / "m" / ckpt.CONFIG).write_text(json.dumps({**meta, "kind": "classifier-lstm"}))
    with pytest.raises(ValueError, match=r"not a classifier \(kind 'classifier-lstm'; known kinds: .*classifier-cnn"):
        ckpt.load_classifier(tmp_path / "m")


def test_config_from_another_kind_is_a_clear_error(tmp_path):
    ckpt.save_classifier(make("gru"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / ckpt.CONFIG).read_text())
    (tmp_path / "m" / ckpt.CONFIG).write_text(json.dumps({**meta, "kind": "classifier-cnn"}))
    with pytest.raises(ValueError, match="config does not fit kind 'classifier-cnn'"):
        ckpt.load_classifier(tmp_path / "m")


@pytest.mark.parametrize(
    "build,msg",
    [
        (lambda: CNNConfig(labels=LABELS, kernel_sizes=[]), "kernel_sizes"),
        (lambda: CNNConfig(labels=["only"]), "at least 2 labels"),
        (lambda: GRUConfig(labels=LABELS, pooling="max"), "pooling"),
        (lambda: GRUConfig(labels=LABELS, hidden=0), "hidden"),
        (lambda: GRUConfig(labels=LABELS, dropout=1.0), "dropout"),
    ],
)
def test_bad_configs_raise(build, msg):
    with pytest.raises(ValueError, match=msg):
        build()


@pytest.mark.parametrize("kind", ["cnn", "gru"])
def test_learns_which_marker_token_a_text_holds(kind):
    """Minimum functionality: label = which of three marker tokens appears somewhere in the text."""
    g = torch.Generator().manual_seed(0)
    n = 96
    ids = torch.randint(3, VOCAB, (n, 20), generator=g)
    lengths = torch.randint(5, 21, (n,), generator=g)
    y = torch.arange(n) % 3
    pos = (torch.rand(n, generator=g) * lengths).long()
    ids[torch.arange(n), pos] = y  # token id = label
    model = make(kind, dropout=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(ids, lengths), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.3 * first
    assert (model(ids, lengths).argmax(-1) == y).float().mean() > 0.9
