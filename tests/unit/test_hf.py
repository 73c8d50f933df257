"""Hugging Face GPT-2 import and export (models/hf.py) against transformers itself, offline, on tiny random models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the library itself never imports it
from safetensors.torch import load_file, save_file

from models.bundle import load_bundle, write_bundle
from models.checkpoint import save_classifier, save_lm
from models.classifier import ClassifierConfig, TransformerClassifier
from models.errors import ArtifactError
from models.hf import HEAD_FILE, NOTE_FILE, export_hf, read_hf_gpt2
from models.tokenizer import EOT, MASK, PAD, TOKENIZER_FILE
from models.transformer import GPT, GPTConfig

TEXTS = ["def add(a, b):\n    return a + b", "class Point:\n    x: int", "import os, sys", "print('hello world')"] * 8
ATOL = 1e-4


def train_gpt2_tokenizer(extra_specials: tuple[str, ...] = ()):
    """A ByteLevel BPE tokenizer like GPT-2's (only `<|endoftext|>` special) trained on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOT, *extra_specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def make_hf_gpt2(folder: Path, activation: str = "gelu_new", **config) -> Path:
    """A random small `GPT2LMHeadModel` + tokenizer saved the way transformers saves them."""
    tok = train_gpt2_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        activation_function=activation,
        **config,
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms too, so a missed or misplaced tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    tok.save(str(folder / TOKENIZER_FILE))
    return folder


def ids_of(tok, texts: list[str], T: int = 12) -> torch.Tensor:
    rows = [tok.encode(t).ids[:T] for t in texts]
    return torch.tensor([r + [r[-1]] * (T - len(r)) for r in rows])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return make_hf_gpt2(tmp_path_factory.mktemp("hf") / "gpt2")


# --------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_imported_gpt2_gives_transformers_logits(tmp_path, activation):
    folder = make_hf_gpt2(tmp_path / "gpt2", activation)
    ours, tok = read_hf_gpt2(folder)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = ids_of(tok, TEXTS[:4])
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)[0][..., : want.shape[-1]]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert ours.config.activation == ("gelu_tanh" if activation == "gelu_new" else "gelu")
    assert ours.config.bias and ours.config.block_size == 32 and ours.config.pos_encoding == "learned"


def test_import_reads_a_sharded_checkpoint(tmp_path):
    folder = make_hf_gpt2(tmp_path / "gpt2")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    (folder / "model.safetensors").unlink()
    theirs.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    ours, tok = read_hf_gpt2(folder)
    ids = ids_of(tok, TEXTS[:2])
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids)[0][..., : want.shape[-1]], want, atol=ATOL, rtol=0)


def test_import_adds_pad_and_mask_after_the_checkpoint_vocab(hf_folder):
    model, tok = read_hf_gpt2(hf_folder)
    n = json.loads((hf_folder / "config.json").read_text())["vocab_size"]
    assert {tok.token_to_id(PAD), tok.token_to_id(MASK)} == {n, n + 1}
    assert tok.token_to_id(EOT) is not None and model.config.vocab_size == n + 2
    assert torch.equal(model.wte.weight[n:], torch.zeros_like(model.wte.weight[n:]))
    assert model.lm_head.weight is model.wte.weight


def test_import_keeps_pad_and_mask_the_tokenizer_has(tmp_path):
    folder = make_hf_gpt2(tmp_path / "gpt2")
    tok = train_gpt2_tokenizer((PAD, MASK))
    tok.save(str(folder / TOKENIZER_FILE))
    model, loaded = read_hf_gpt2(folder)
    assert loaded.get_vocab_size() == tok.get_vocab_size() and loaded.token_to_id(PAD) == tok.token_to_id(PAD)


def test_old_model_configs_load_with_exact_gelu():
    cfg = GPTConfig.from_dict({k: v for k, v in GPTConfig().to_dict().items() if k != "activation"})
    assert cfg.activation == "gelu"
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="relu")


# --------------------------------------------------------------------------------------------- bad input
def _edit_config(folder: Path, **changes) -> None:
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def _edit_weights(folder: Path, edit) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


BAD_INPUTS = {
    "missing folder": (shutil.rmtree, "no such Hugging Face checkpoint folder"),
    "no config": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "not gpt2": (
        lambda d: _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
        r"config.json: model_type 'llama' \(architectures: LlamaForCausalLM\) is not GPT-2 family",
    ),
    "relu": (lambda d: _edit_config(d, activation_function="relu"), "config.json: activation_function 'relu'"),
    "cross attention": (
        lambda d: _edit_config(d, add_cross_attention=True),
        "config.json: add_cross_attention: True is not supported",
    ),
    "inverse layer scaling": (
        lambda d: _edit_config(d, scale_attn_by_inverse_layer_idx=True),
        "config.json: scale_attn_by_inverse_layer_idx",
    ),
    "reorder attention": (
        lambda d: _edit_config(d, reorder_and_upcast_attn=True),
        "config.json: reorder_and_upcast_attn",
    ),
    "missing tensor": (
        lambda d: _edit_weights(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
        "model.safetensors: tensor h.1.mlp.c_fc.bias missing",
    ),
    "wrong shape": (
        lambda d: _edit_weights(d, lambda t: t.update({"transformer.wpe.weight": torch.zeros(16, 16)})),
        r"model.safetensors: tensor wpe.weight has shape \(16, 16\), config.json needs \(32, 16\)",
    ),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
    "pickle weights": (
        lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
        "model.safetensors: missing; pytorch_model.bin is a pickle, which lmforge never loads",
    ),
    "no tokenizer": (lambda d: (d / TOKENIZER_FILE).unlink(), "tokenizer.json: missing"),
    "tokenizer of another model": (
        lambda d: _edit_config(d, vocab_size=100),
        r"tokenizer.json: \d+ tokens, more than config.json's vocab_size 100",
    ),
    "no end of text": (
        lambda d: (d / TOKENIZER_FILE).write_text((d / TOKENIZER_FILE).read_text().replace(EOT, "<|eot|>")),
        "tokenizer.json: no <\\|endoftext\\|> token",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_is_one_line_naming_file_and_field(tmp_path, hf_folder, case):
    folder = tmp_path / "gpt2"
    shutil.copytree(hf_folder, folder)
    damage, message = BAD_INPUTS[case]
    damage(folder)
    with pytest.raises(ArtifactError, match=message) as err:
        read_hf_gpt2(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


# --------------------------------------------------------------------------------------------- export
def _lmforge_bundle(tmp_path: Path, pooling: str, window: int = 0, bias: bool = False, **trunk) -> Path:
    """A random lmforge bundle (tokenizer with lmforge's special tokens, LM, classifier) in `tmp_path/bundle`."""
    tok = train_gpt2_tokenizer((PAD, MASK))
    tok.save(str(tmp_path / TOKENIZER_FILE))
    torch.manual_seed(1)
    base = dict(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=16, bias=bias, **trunk)
    lm = GPT(GPTConfig(**base))
    save_lm(lm, tmp_path / "lm")
    classifier = TransformerClassifier(
        ClassifierConfig(GPTConfig(**{**base, "attn_window": window}), ["a", "b", "c"], pooling)
    )
    with torch.no_grad():
        classifier.trunk.load_state_dict(lm.state_dict())
        classifier.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        classifier.head.weight.mul_(50)
    save_classifier(classifier, tmp_path / "classifier", {"max_length": 32})
    write_bundle(tmp_path / "bundle", tmp_path / TOKENIZER_FILE, tmp_path / "classifier", tmp_path / "lm")
    return tmp_path / "bundle"


def _padded(bundle, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = bundle.encode(texts)
    return ids, (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()


def test_lm_export_gives_lmforge_logits_in_transformers(tmp_path):
    source = _lmforge_bundle(tmp_path, "last", bias=True)
    assert export_hf(source, tmp_path / "hf") == {
        "classifier": "GPT2ForSequenceClassification",
        "lm": "GPT2LMHeadModel",
    }
    bundle = load_bundle(source)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf" / "lm").eval()
    ids, _ = _padded(bundle, TEXTS[:3])
    with torch.no_grad():
        want = bundle.lm(ids)[0][..., : bundle.lm.config.vocab_size]
        torch.testing.assert_close(theirs(ids).logits, want, atol=ATOL, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf" / "lm")
    assert auto.pad_token == PAD and auto.eos_token == EOT
    assert auto(TEXTS[0])["input_ids"] == bundle.tokenizer.encode(TEXTS[0]).ids


def test_last_pooling_dense_classifier_exports_as_sequence_classification(tmp_path):
    source = _lmforge_bundle(tmp_path, "last")
    export_hf(source, tmp_path / "hf")
    bundle = load_bundle(source)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf" / "classifier").eval()
    assert type(theirs).__name__ == "GPT2ForSequenceClassification"
    assert theirs.config.id2label == {0: "a", 1: "b", 2: "c"}
    texts = ["x", *TEXTS[:4]]
    ids, mask = _padded(bundle, texts)
    with torch.no_grad():
        want = bundle.classifier(ids, mask.sum(1))
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf" / "classifier")
    enc = auto(texts, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids)


@pytest.mark.parametrize(("pooling", "window"), [("mean", 0), ("last", 8)])
def test_other_classifiers_export_trunk_and_head(tmp_path, pooling, window):
    source = _lmforge_bundle(tmp_path, pooling, window)
    assert export_hf(source, tmp_path / "hf")["classifier"] == "GPT2Model"
    out = tmp_path / "hf" / "classifier"
    note = json.loads((out / NOTE_FILE).read_text())
    assert note["pooling"] == pooling and note["exact_up_to_tokens"] == (window or 32)
    bundle = load_bundle(source)
    trunk = transformers.AutoModel.from_pretrained(out).eval()
    head = load_file(str(out / HEAD_FILE))
    texts = ["x", "import os", "a + b", *TEXTS[:4]]
    if window:  # exact for texts within the window
        texts = [t for t in texts if len(bundle.tokenizer.encode(t).ids) <= window]
    assert len(texts) >= 3
    ids, mask = _padded(bundle, texts)
    with torch.no_grad():
        h = trunk(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "mean":  # the README recipe
            m = mask.unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
        else:
            pooled = h[torch.arange(len(texts)), mask.sum(1) - 1]
        logits = pooled @ head["weight"].T + head["bias"]
        torch.testing.assert_close(logits, bundle.classifier(ids, mask.sum(1)), atol=ATOL, rtol=0)


def test_round_trip_import_of_an_exported_lm(tmp_path):
    source = _lmforge_bundle(tmp_path, "last", activation="gelu_tanh")
    export_hf(source, tmp_path / "hf")
    back, tok = read_hf_gpt2(tmp_path / "hf" / "lm")
    ours = load_bundle(source).lm
    ids = ids_of(tok, TEXTS[:2])
    with torch.no_grad():
        n = ours.config.vocab_size  # the rows past it only pad the matmul
        torch.testing.assert_close(back(ids)[0][..., :n], ours(ids)[0][..., :n], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("trunk", "message"),
    [
        ({"pos_encoding": "rope"}, "rotary positions have no GPT-2 form; export --format onnx"),
        ({"layer_ffn": [8, 8]}, "pruned attention heads or MLP widths"),
        ({"causal": False}, "bidirectional"),
    ],
)
def test_export_refuses_what_gpt2_cannot_express(tmp_path, trunk, message):
    source = _lmforge_bundle(tmp_path, "last", **trunk)
    with pytest.raises(ArtifactError, match=message) as err:
        export_hf(source, tmp_path / "hf")
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


def test_export_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(ArtifactError, match="not a bundle folder"):
        export_hf(tmp_path, tmp_path / "hf")


# --------------------------------------------------------------------------------------------- lmforge export
def _export(*args: str):
    from typer.testing import CliRunner

    from tasks.ops.cli import app

    return CliRunner().invoke(app, ["export", *args, "--params", str(Path(__file__).parents[2] / "params.yaml")])


def test_cli_exports_a_bundle_folder_that_transformers_loads(tmp_path):
    source = _lmforge_bundle(tmp_path, "last")
    res = _export(str(source), "--format", "hf", "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    assert "classifier/model.safetensors" in res.output and "lm/tokenizer_config.json" in res.output
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "classifier")
    assert model.config.num_labels == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left beside it


def test_cli_refuses_a_non_empty_out_and_leaves_it_alone(tmp_path):
    source = _lmforge_bundle(tmp_path, "last")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    res = _export(str(source), "--format", "hf", "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and "exists and is not empty; refusing to replace it" in res.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "gguf"], "--format: 'gguf' is not one of hf, onnx"),
        (["--format", "hf"], "rotary positions have no GPT-2 form"),
    ],
)
def test_cli_reports_bad_requests_in_one_line(tmp_path, args, message):
    source = _lmforge_bundle(tmp_path, "last", pos_encoding="rope")
    res = _export(str(source), *args, "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_onnx_export_of_an_int8_classifier_in_one_line(tmp_path):
    from models.checkpoint import load_classifier, save_quantized
    from models.quantize import quantize_classifier

    source = _lmforge_bundle(tmp_path, "mean")
    fp32 = load_classifier(source / "classifier")
    save_quantized(quantize_classifier(fp32, "torch.ao"), fp32.config, tmp_path / "int8", "torch.ao", True)
    write_bundle(tmp_path / "int8-bundle", source / TOKENIZER_FILE, tmp_path / "int8", source / "lm")
    res = _export(str(tmp_path / "int8-bundle"), "--format", "onnx", "--out", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert "classifier/config.json: only a float Transformer classifier exports to ONNX" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- pretrain.init_from
@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """A tiny project cleaned and validated, ready for tokenize."""
    from conftest import LABELS, TINY_CLEAN, TINY_VALIDATE, _project, write_raw

    from tasks import clean, validate

    paths = _project(tmp_path_factory.mktemp("init_from"))
    write_raw(paths)
    clean.run(TINY_CLEAN, paths)
    validate.run(TINY_VALIDATE, TINY_CLEAN, LABELS, True, paths)
    return paths


def _pretrain(**kw):
    from conftest import TINY_PRETRAIN

    return TINY_PRETRAIN.model_validate({**TINY_PRETRAIN.model_dump(), "checkpoint_interval": 0, **kw})


def test_tokenize_takes_the_checkpoint_tokenizer_and_pretrain_0_steps_writes_the_imported_lm(cleaned, hf_folder):
    from conftest import TINY_TOKENIZE

    from models.checkpoint import load_lm
    from models.tokenizer import load_tokenizer
    from tasks import pretrain, tokenize

    result = tokenize.run(TINY_TOKENIZE, cleaned, init_from=str(hf_folder))
    tok = load_tokenizer(cleaned.tokenizer)
    _, imported = read_hf_gpt2(hf_folder)
    assert result.vocab_size == imported.get_vocab_size() == tok.get_vocab_size() != TINY_TOKENIZE.vocab_size
    assert tok.encode(TEXTS[0]).ids == imported.encode(TEXTS[0]).ids
    meta = json.loads((cleaned.tokens / "meta.json").read_text())
    assert (meta["pad_id"], meta["mask_id"]) == (tok.token_to_id(PAD), tok.token_to_id(MASK))

    r = pretrain.run(_pretrain(init_from=str(hf_folder), max_steps=0), cleaned)
    assert r.steps == 0 and r.final_train_loss is None and r.val_loss > 0
    lm = load_lm(cleaned.lm)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ids = ids_of(tok, TEXTS[:2])
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(lm(ids)[0][..., : want.shape[-1]], want, atol=ATOL, rtol=0)

    trained = pretrain.run(_pretrain(init_from=str(hf_folder), max_steps=4), cleaned)
    after = load_lm(cleaned.lm)
    assert trained.steps == 4 and after.config.activation == "gelu_tanh" and after.config.bias
    moved = max((a - b).abs().max().item() for a, b in zip(after.state_dict().values(), lm.state_dict().values()))
    assert 0 < moved < 0.03  # 4 AdamW steps of lr <= 3e-3 from the imported weights, not from a new model


def test_pretrain_refuses_tokens_of_another_tokenizer(cleaned, hf_folder):
    from conftest import TINY_TOKENIZE

    from tasks import pretrain, tokenize
    from tasks.shared.errors import UserError

    tokenize.run(TINY_TOKENIZE, cleaned)  # trained, not the checkpoint's
    with pytest.raises(UserError, match=r"meta.json: vocab_size \d+ is not init_from's tokenizer's"):
        pretrain.run(_pretrain(init_from=str(hf_folder), max_steps=0), cleaned)


def test_config_needs_init_from_for_zero_steps_and_a_causal_objective():
    with pytest.raises(ValueError, match="max_steps 0 needs init_from"):
        _pretrain(max_steps=0)
    with pytest.raises(ValueError, match="objective must be causal"):
        _pretrain(init_from="gpt2", objective="mlm")


def test_cli_exports_registered_versions_by_number_and_alias(tmp_path, mlflow_db, monkeypatch):
    from mlflow import MlflowClient
    from tasks.shared.config.params import load_params

    name = load_params(Path(__file__).parents[2] / "params.yaml").tracking.registered_model
    source = _lmforge_bundle(tmp_path, "last")
    logged = tmp_path / "logged"
    shutil.copytree(source, logged / "artifacts" / "bundle")  # laid out as `lmforge promote` logs a version
    client = MlflowClient(tracking_uri=mlflow_db, registry_uri=mlflow_db)
    client.create_registered_model(name)
    client.set_registered_model_alias(name, "champion", client.create_model_version(name, str(logged)).version)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_db)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for version in ("champion", "v1"):
        res = _export(version, "--format", "hf", "--out", str(tmp_path / version))
        assert res.exit_code == 0, res.output
        assert (tmp_path / version / "classifier" / "model.safetensors").is_file()
    res = _export("7", "--format", "hf", "--out", str(tmp_path / "7"))
    assert res.exit_code == 2 and f"no version 7 of '{name}'" in res.output and not (tmp_path / "7").exists()
