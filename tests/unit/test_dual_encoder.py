"""The dual encoder: shapes and unit norms, CLIP's loss and its gradients, the bundle's round trip and its int8 copy,
and the batches of align_train."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_lm
from models.dual_encoder import (
    KINDS,
    MAX_LOGIT_SCALE,
    DualEncoderConfig,
    DualEncoderNet,
    Encoder,
    clip_loss,
    encode,
    kind_tokenizer,
    load_encoder,
    write_encoder,
)
from models.errors import ArtifactError
from models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, tiny
from tasks.align.train import Tokens, bm25_ranks, module_batches, module_partners, ranks

TEXTS = ["Return the parsed header.", "Close the socket and free it.", "", "Split a path into parts."]
CODES = [
    "def parse_header(line):\n    return line.split(':')",
    "def close(self):\n    self.sock.close()",
    "def f():\n    pass",
    "def split_path(p):\n    return p.split('/')",
]


def train_tokenizer(folder: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS)))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILE))
    return folder / TOKENIZER_FILE


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, GPT]:
    """A tiny tokenizer file and a tiny LM of its vocabulary."""
    base = tmp_path_factory.mktemp("dual")
    file = train_tokenizer(base / "tokenizer", TEXTS + CODES)
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=load_tokenizer(file).get_vocab_size(), block_size=32))
    save_lm(lm, base / "lm")
    return file, lm


def make_net(lm: GPT, shared: bool = True, pooling: str = "mean") -> DualEncoderNet:
    torch.manual_seed(0)
    net = DualEncoderNet(DualEncoderConfig(lm.config, shared, pooling, 8, 16, 24))
    net.load_trunks(lm)
    return net


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "last", "mean_lexical"])
def test_forward_gives_unit_vectors_of_dim_for_both_kinds(parts, shared, pooling):
    file, lm = parts
    net = make_net(lm, shared, pooling)
    for kind, texts in zip(KINDS, (TEXTS, CODES)):
        ids, mask = encode(kind_tokenizer(file, net.config.max_length(kind)), texts)
        out = net(ids, mask, kind)
        assert out.shape == (len(texts), 8)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(texts)))
    assert len(net.trunks) == (1 if shared else 2)


def test_towers_start_from_the_pretrained_lm(parts):
    _, lm = parts
    net = make_net(lm, shared=False)
    for trunk in net.trunks.values():
        torch.testing.assert_close(trunk.blocks[0].attn.qkv.weight, lm.blocks[0].attn.qkv.weight)


def test_padding_and_truncation_come_from_the_tokenizer(parts):
    file, _ = parts
    ids, mask = encode(kind_tokenizer(file, 5), ["a b c d e f g h i j", "a", ""])
    assert ids.shape == mask.shape == (3, 5)
    assert mask.sum(1).tolist() == [5, 1, 1]  # an empty text reads one pad token
    assert not mask[1, 1:].any()


def test_config_refuses_bad_values(parts):
    _, lm = parts
    with pytest.raises(ValueError, match="pooling"):
        DualEncoderConfig(lm.config, pooling="max", max_text_length=16, max_code_length=16)
    with pytest.raises(ValueError, match="max_code_length"):
        DualEncoderConfig(lm.config, max_text_length=16, max_code_length=lm.config.block_size + 1)
    with pytest.raises(ValueError, match="kind"):
        make_net(lm)(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), "image")
    cfg = DualEncoderConfig(lm.config, False, "last", 8, 16, 24)
    assert DualEncoderConfig.from_dict(cfg.to_dict()) == cfg


def test_clip_loss_is_symmetric_finite_and_lowest_for_matching_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    assert torch.isfinite(clip_loss(a, b, scale))
    torch.testing.assert_close(clip_loss(a, b, scale), clip_loss(b, a, scale))
    assert clip_loss(a, a, scale) < clip_loss(a, b, scale)
    assert clip_loss(a, a, scale, negatives=b) >= clip_loss(a, a, scale)  # an extra column only adds to the sum


def test_gradients_reach_both_towers_and_the_temperature(parts):
    file, lm = parts
    net = make_net(lm, shared=False)
    t = net(*encode(kind_tokenizer(file, 16), TEXTS), "text")
    c = net(*encode(kind_tokenizer(file, 24), CODES), "code")
    clip_loss(t, c, net.scale()).backward()
    for name in ("trunks.text.blocks.1.mlp.fc.weight", "trunks.code.blocks.1.mlp.fc.weight", "heads.text.weight"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    assert net.heads["code"].weight.grad.abs().sum() > 0
    assert net.logit_scale.grad is not None and net.logit_scale.grad != 0


def test_logit_scale_starts_at_clips_temperature_and_is_clamped(parts):
    _, lm = parts
    net = make_net(lm)
    assert net.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        net.logit_scale.fill_(10.0)
    assert net.scale().item() == pytest.approx(math.exp(MAX_LOGIT_SCALE))


@pytest.fixture
def bundle(parts, tmp_path) -> tuple[Path, DualEncoderNet]:
    file, lm = parts
    net = make_net(lm, shared=False, pooling="last").eval()
    (tmp_path / "train.json").write_text("{}")
    write_encoder(tmp_path, net, file.parent, {"train_config": {"epochs": 1}})
    return tmp_path, net


def test_bundle_round_trip_gives_identical_embeddings(bundle, parts):
    folder, net = bundle
    enc = load_encoder(folder)
    direct = Encoder(net, parts[0], "")
    for kind, texts in zip(KINDS, (TEXTS, CODES)):
        got = enc.embed(texts, kind, batch_size=3)
        assert got.dtype == np.float32 and got.shape == (len(texts), enc.dim)
        np.testing.assert_array_equal(got, direct.embed(texts, kind, batch_size=3))
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert enc.config == net.config and len(enc.version) == 64
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "encoder.safetensors",
        "manifest.json",
        TOKENIZER_FILE,
        "train.json",
    ]


def test_embeddings_do_not_depend_on_batching(bundle):
    enc = load_encoder(bundle[0])
    whole = enc.embed(CODES, "code", batch_size=64)
    for i, code in enumerate(CODES):
        np.testing.assert_allclose(enc.embed([code], "code")[0], whole[i], atol=1e-5)


@pytest.mark.parametrize("file", ["encoder.safetensors", "config.json", TOKENIZER_FILE, "manifest.json"])
def test_a_corrupt_or_missing_file_is_an_artifact_error(bundle, file):
    folder, _ = bundle
    f = folder / file
    f.write_bytes(f.read_bytes()[:-7] + b"garbage")
    with pytest.raises(ArtifactError):
        load_encoder(folder)
    f.unlink()
    with pytest.raises(ArtifactError):
        load_encoder(folder)


def test_quantized_encoder_is_close_to_fp32_and_smaller(bundle):
    enc = load_encoder(bundle[0])
    q = enc.quantized()
    assert q.variant == "int8" and q.version == enc.version and enc.variant == "fp32"
    assert q.size_mb() < enc.size_mb()
    for kind, texts in zip(KINDS, (TEXTS, CODES)):
        cos = (q.embed(texts, kind) * enc.embed(texts, kind)).sum(1)
        assert cos.min() > 0.95, cos


def test_module_batches_keep_runs_of_one_module_and_cover_every_row():
    modules = np.repeat(np.arange(5), [7, 1, 4, 9, 3])
    batches = module_batches(modules, 8, 4, np.random.default_rng(0))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(modules)))
    assert all(len(b) <= 8 for b in batches)
    runs = sum(1 for i in range(1, len(rows)) if modules[rows[i]] != modules[rows[i - 1]]) + 1
    assert runs <= sum(math.ceil(n / 4) for n in (7, 1, 4, 9, 3))


def test_module_partners_are_another_row_of_the_same_module():
    modules = np.repeat(np.arange(4), [5, 1, 2, 6])
    partners = module_partners(modules, np.random.default_rng(0))
    for i, p in enumerate(partners):
        if (modules == modules[i]).sum() > 1:
            assert p != i and modules[p] == modules[i]


def test_ranks_of_dense_and_bm25_put_the_gold_first_when_it_matches_best():
    v = np.eye(4, dtype=np.float32)
    assert ranks(v, v).tolist() == [1, 1, 1, 1]
    assert ranks(v, v[::-1].copy()).tolist() == [2, 2, 2, 2]  # another row beats each gold, ties do not count
    got = bm25_ranks(["parse the header", "close socket"], ["def parse_header(): pass", "def close_socket(): pass"])
    assert got.tolist() == [1, 1]


def test_pretokenized_batches_match_encoding_the_batch(parts):
    file, _ = parts
    tokenizer = kind_tokenizer(file, 24)
    tokens = Tokens.of(tokenizer, CODES)
    rows = np.array([1, 0])
    ids, mask = tokens.batch(rows)
    want_ids, want_mask = encode(tokenizer, [CODES[r] for r in rows])
    assert torch.equal(mask, want_mask) and torch.equal(ids[mask], want_ids[want_mask])
    assert ids.shape == want_ids.shape  # padded to the batch's longest, not the whole set's


def test_lexical_pooling_reads_the_input_embeddings(parts):
    file, lm = parts
    net = make_net(lm, pooling="mean_lexical").eval()
    ids, mask = encode(kind_tokenizer(file, 16), TEXTS)
    head, width = net.heads["text"], lm.config.n_embd
    assert head.in_features == 2 * width
    with torch.no_grad():
        head.weight[:, :width] = 0  # only the mean of the input embeddings is left
        e = net.trunk("text").wte(ids) * mask[..., None]
        want = torch.nn.functional.normalize(head(torch.cat([e, e], -1).sum(1) / mask.sum(1, keepdim=True)), dim=-1)
        torch.testing.assert_close(net(ids, mask, "text"), want)
