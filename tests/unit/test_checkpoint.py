"""On-disk model format: exact round trips and loud failures on broken folders (int8 specifics: test_quantize.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import append, delete, flip_byte, truncate
from torch.testing import assert_close

from models import checkpoint as ckpt
from models import quantize as quant
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, tiny

VOCAB = 300


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 24), generator=g)
    return ids, torch.tensor([24, 10, 3, 17])


@pytest.fixture
def clf() -> TransformerClassifier:
    torch.manual_seed(0)
    m = TransformerClassifier(
        ClassifierConfig(trunk=tiny(vocab_size=VOCAB), labels=["db", "net", "ui"], pooling="mean")
    )
    torch.nn.init.normal_(m.head.weight, std=0.5)
    return m.eval()


def test_lm_round_trip(tmp_path):
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=VOCAB)).eval()
    ckpt.save_lm(lm, tmp_path / "lm", extra={"note": "x"})
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == [ckpt.CONFIG, ckpt.WEIGHTS]
    loaded = ckpt.load_lm(tmp_path / "lm")
    assert not loaded.training
    assert loaded.config == lm.config
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
    for k, v in lm.state_dict().items():
        assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    ids, _ = _batch()
    assert_close(loaded(ids)[0], lm(ids)[0], rtol=0, atol=0)
    meta = ckpt.read_config(tmp_path / "lm")
    assert meta["kind"] == "gpt" and meta["note"] == "x"


def test_classifier_round_trip(tmp_path, clf):
    ckpt.save_classifier(clf, tmp_path / "clf", extra={"max_length": 24})
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [ckpt.CONFIG, ckpt.WEIGHTS]
    loaded = ckpt.load_classifier(tmp_path / "clf")
    assert isinstance(loaded, TransformerClassifier) and not loaded.training
    assert loaded.config.labels == ["db", "net", "ui"] and loaded.config.pooling == "mean"
    ids, n = _batch()
    assert_close(loaded(ids, n), clf(ids, n), rtol=0, atol=0)
    assert ckpt.read_config(tmp_path / "clf")["max_length"] == 24


def write(text: str | bytes):
    def corrupt(f):
        f.write_bytes(text if isinstance(text, bytes) else text.encode())

    corrupt.__name__ = f"write-{text[:10]!r}"
    return corrupt


def save(kind: str, clf, folder):
    """A saved model folder of `kind` and the function that loads it."""
    if kind == "lm":
        torch.manual_seed(0)
        ckpt.save_lm(GPT(tiny(vocab_size=VOCAB)), folder)
        return ckpt.load_lm
    if kind == "int8":
        ckpt.save_quantized(quant.quantize_classifier(clf), clf.config, folder, "torch.ao", per_channel=True)
    else:
        ckpt.save_classifier(clf, folder)
    return ckpt.load_classifier


# (file, what happens to it, what the error says after the file name)
BROKEN_FILES = [
    (ckpt.WEIGHTS, truncate, "not a readable safetensors file"),
    (ckpt.WEIGHTS, write(b""), "not a readable safetensors file"),
    (ckpt.WEIGHTS, write(b"\x08" + bytes(7) + b"{garbage"), "not a readable safetensors file"),
    (ckpt.WEIGHTS, delete, "missing"),
    (ckpt.CONFIG, write("{not json"), "not valid JSON"),
    (ckpt.CONFIG, truncate, "not valid JSON"),
    (ckpt.CONFIG, write(b"\xff\xfe\x00"), "not valid JSON"),
    (ckpt.CONFIG, write("[1, 2]"), "no JSON object entry"),
    (ckpt.CONFIG, write('{"kind": "gpt"}'), "no config entry"),
    (ckpt.CONFIG, write('{"kind": ["gpt"], "config": {}}'), "kind ['gpt'] is not a name"),
    (ckpt.CONFIG, delete, "model config not found"),
]


@pytest.mark.parametrize("kind", ["lm", "classifier", "int8"])
@pytest.mark.parametrize("file,corrupt,problem", BROKEN_FILES, ids=[f"{f}-{c.__name__}" for f, c, _ in BROKEN_FILES])
def test_a_broken_model_folder_raises_one_artifact_error_naming_the_file(tmp_path, clf, kind, file, corrupt, problem):
    load = save(kind, clf, tmp_path / "m")
    corrupt(tmp_path / "m" / file)
    with pytest.raises(ckpt.ArtifactError) as e:
        load(tmp_path / "m")
    assert e.value.file == tmp_path / "m" / file and e.value.problem.startswith(problem)
    assert str(e.value).startswith(f"{tmp_path / 'm' / file}: {problem}") and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
    if file == ckpt.CONFIG:
        with pytest.raises(ckpt.ArtifactError, match=re.escape(problem)):
            ckpt.read_config(tmp_path / "m")


def test_artifact_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(ckpt.ArtifactError("/x/model.safetensors", "missing")))
    assert str(e) == "/x/model.safetensors: missing" and e.problem == "missing"


# --- manifests -----------------------------------------------------------------------------------


@pytest.fixture
def manifested(tmp_path, clf):
    folder = tmp_path / "bundle"
    ckpt.save_classifier(clf, folder / "classifier")
    (folder / "notes.txt").write_text("hello")
    ckpt.write_manifest(folder)
    return folder


def test_manifest_lists_every_file_with_size_and_sha256(manifested):
    import hashlib

    files = json.loads((manifested / ckpt.MANIFEST).read_text())["files"]
    assert sorted(files) == ["classifier/config.json", "classifier/model.safetensors", "notes.txt"]
    weights = manifested / "classifier" / ckpt.WEIGHTS
    assert files["classifier/model.safetensors"] == {
        "size": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert ckpt.verify_manifest(manifested) is True
    (manifested / ckpt.MANIFEST).unlink()
    assert ckpt.verify_manifest(manifested) is False  # older folders: nothing to check against


# (file, what happens to it, the error)
TAMPERED = [
    ("classifier/model.safetensors", truncate, r"truncated \(\d+ bytes, \d+ expected\)"),
    ("classifier/model.safetensors", flip_byte, r"corrupt \(sha256 mismatch\)"),
    ("classifier/model.safetensors", append, r"wrong size \(\d+ bytes, \d+ expected\)"),
    ("classifier/config.json", delete, "missing"),
    ("notes.txt", write("hellO"), "corrupt"),
    (ckpt.MANIFEST, write("{"), "not valid JSON"),
    (ckpt.MANIFEST, write("{}"), "no files entry"),
    (ckpt.MANIFEST, write('{"files": {"notes.txt": {"size": 5}}}'), "malformed entry for notes.txt"),
]


@pytest.mark.parametrize("file,corrupt,problem", TAMPERED, ids=[f"{f}-{c.__name__}" for f, c, _ in TAMPERED])
def test_verify_manifest_names_the_first_bad_file(manifested, file, corrupt, problem):
    corrupt(manifested / file)
    with pytest.raises(ckpt.ArtifactError) as e:
        ckpt.verify_manifest(manifested)
    assert e.value.file == manifested / file and re.fullmatch(problem + ".*", e.value.problem)


def _edit_config(folder, edit) -> None:
    f = folder / ckpt.CONFIG
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))


def test_unknown_config_key_raises(tmp_path, clf):
    ckpt.save_classifier(clf, tmp_path / "clf")
    _edit_config(tmp_path / "clf", lambda m: m["config"]["trunk"].update(n_layers=2))
    with pytest.raises(ckpt.ArtifactError, match="config.json: config does not fit .*unknown model config keys"):
        ckpt.load_classifier(tmp_path / "clf")


def test_wrong_kind_raises(tmp_path):
    torch.manual_seed(0)
    ckpt.save_lm(GPT(tiny(vocab_size=VOCAB)), tmp_path / "lm")
    with pytest.raises(ckpt.ArtifactError, match="config.json: not a classifier"):
        ckpt.load_classifier(tmp_path / "lm")


def test_config_that_disagrees_with_weights_raises_fp32(tmp_path, clf):
    ckpt.save_classifier(clf, tmp_path / "clf")
    _edit_config(tmp_path / "clf", lambda m: m["config"]["trunk"].update(n_embd=32))
    with pytest.raises(ckpt.ArtifactError, match="model.safetensors: weights do not match config.json .*size mismatch"):
        ckpt.load_classifier(tmp_path / "clf")
