"""The servable bundle built from the tiny run's outputs, as the service and MLflow load it."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest
import torch
from conftest import LABELS, TINY_FINETUNE, append, delete, flip_byte, garbage, truncate
from torch.testing import assert_close

from models.bundle import Bundle, load_bundle, load_parts, write_bundle
from models.checkpoint import ArtifactError
from models.tokenizer import EOT, TOKENIZER_FILE, encode_texts

TEXTS = [
    "def net_socket_host_1(self, port, recv=None):\n    return self.packet.send(port)",
    "def db_cursor_query_2(self, row, commit=None):\n    return self.table.index(row)",
    "def ui_widget_button_3(self, click, color=None):\n    return self.window.render(click)",
    "x",
    "ünïcode and emoji 🚀 " * 20,
]


@pytest.fixture(scope="module")
def bundle_dir(tiny_pipeline, tmp_path_factory):
    p = tiny_pipeline.paths
    target = tmp_path_factory.mktemp("bundle") / "bundle"
    write_bundle(target, p.tokenizer / TOKENIZER_FILE, p.classifier, p.lm)
    return target


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> Bundle:
    return load_bundle(bundle_dir)


def test_bundle_layout(bundle_dir):
    assert {p.name for p in bundle_dir.iterdir()} == {"tokenizer.json", "classifier", "lm", "manifest.json"}
    assert {p.name for p in (bundle_dir / "lm").iterdir()} == {
        "model.safetensors",
        "config.json",
    }  # no plots or history
    listed = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    assert set(listed) == {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()} - {
        "manifest.json"
    }


def test_loaded_bundle(bundle):
    assert bundle.labels == LABELS and bundle.variant == "fp32"
    assert bundle.max_length == TINY_FINETUNE.max_length
    assert bundle.lm is not None and not bundle.lm.training and not bundle.classifier.training


def test_classify_one_prediction_per_text(bundle):
    preds = bundle.classify(TEXTS)
    assert len(preds) == len(TEXTS)
    for p in preds:
        assert p.label in LABELS
        assert list(p.probabilities) == LABELS
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0 <= v <= 1 for v in p.probabilities.values())
        assert p.probabilities[p.label] == max(p.probabilities.values())


def test_classify_is_batch_independent(bundle):
    together = bundle.probabilities(TEXTS, batch_size=64)
    one_by_one = torch.cat([bundle.probabilities([t]) for t in TEXTS])
    assert_close(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert bundle.probabilities([]).shape == (0, len(LABELS))


def test_bundle_agrees_with_evaluation(bundle, tiny_pipeline):
    pred = pd.read_parquet(tiny_pipeline.paths.evaluation / "predictions.parquet")
    assert [p.label for p in bundle.classify(pred["text"].tolist())] == pred["pred_fp32"].tolist()


@pytest.mark.parametrize("variant", ["int8", "pruned", "sparse", "distilled", "pruned-int8", "distilled-int8"])
def test_every_variant_loads_as_a_bundle_and_in_the_service(tiny_pipeline, tmp_path, variant):
    """Each compressed variant is a classifier folder the service code loads (no pickle) and answers with."""
    from deploy.core import CannotGenerate, generate
    from deploy.requests import EXAMPLE_INPUT, GenerationRequest
    from deploy.resolve import ServedModel, load_service_bundle
    from tasks.shared.variants import folders

    p = tiny_pipeline.paths
    write_bundle(tmp_path / "b", p.tokenizer / TOKENIZER_FILE, folders(p)[variant], p.lm)
    b = load_bundle(tmp_path / "b", with_lm=False)
    assert b.variant == variant and b.lm is None and b.max_length == TINY_FINETUNE.max_length
    preds = b.classify(TEXTS)
    assert len(preds) == len(TEXTS) and all(x.label in LABELS for x in preds)
    scored = pd.read_parquet(p.evaluation / "predictions.parquet")
    assert [x.label for x in b.classify(scored["text"].tolist())] == scored[
        f"pred_{variant}"
    ].tolist()  # what evaluate scored
    served = load_service_bundle(str(tmp_path / "b"))
    assert [x.label for x in served.classify(EXAMPLE_INPUT)] == [x.label for x in b.classify(EXAMPLE_INPUT)]
    if variant.endswith("int8"):
        with pytest.raises(CannotGenerate, match="no language model"):
            generate(ServedModel(b, uri=str(tmp_path / "b"), source="folder"), GenerationRequest("def f("))


@pytest.fixture(scope="module")
def served(bundle):
    from deploy.resolve import ServedModel

    return ServedModel(bundle, uri="bundle", source="folder")


def _generate(served, prompt: str, **kw):
    """The serving core's /generate on the bundle (what REST, gRPC and the smoke gate answer)."""
    from deploy.core import generate
    from deploy.requests import GenerationRequest

    return generate(served, GenerationRequest(prompt, **kw))


def test_generate_returns_the_continuation(bundle, served):
    prompt = "def net_socket("
    text = _generate(served, prompt, max_new_tokens=6, temperature=0.8, top_k=50, seed=3).text
    assert isinstance(text, str)
    ids = bundle.tokenizer.encode(prompt).ids
    out = bundle.lm.generate(
        torch.tensor([ids]), 6, temperature=0.8, top_k=50, generator=torch.Generator().manual_seed(3)
    )
    new = out[0, len(ids) :].tolist()
    assert len(new) == 6
    if bundle.eot_id in new:
        new = new[: new.index(bundle.eot_id)]
    assert text == bundle.tokenizer.decode(new)  # the prompt is not repeated


def test_generate_respects_max_new_tokens(served):
    for n in (1, 5, 40):  # 40 runs past the 32-token block
        out = _generate(served, "def db_query(", max_new_tokens=n, temperature=0)
        assert isinstance(out.text, str)
        assert out.tokens == n if out.finish_reason == "length" else out.tokens < n


def test_generate_is_deterministic(served):
    a = _generate(served, "def ui_", max_new_tokens=10, seed=11)
    assert a == _generate(served, "def ui_", max_new_tokens=10, seed=11)
    greedy = _generate(served, "def ui_", max_new_tokens=10, temperature=0)
    assert greedy == _generate(served, "def ui_", max_new_tokens=10, temperature=0, seed=99)


def test_encode_texts_pads_right_and_truncates(bundle):
    ids, lengths = encode_texts(bundle.tokenizer, ["a", "def " * 50, ""], 32, bundle.pad_id)
    assert ids.shape == (3, 32)
    assert lengths.tolist()[1] == 32 and lengths[0] == len(bundle.tokenizer.encode("a").ids)
    assert lengths[2] == 1 and ids[2, 0] == bundle.pad_id  # empty text becomes one pad token
    assert (ids[0, lengths[0] :] == bundle.pad_id).all()
    assert bundle.tokenizer.token_to_id(EOT) == bundle.eot_id


def test_load_parts_from_stage_outputs(tiny_pipeline):
    p = tiny_pipeline.paths
    b = load_parts(p.tokenizer / TOKENIZER_FILE, p.classifier, p.lm)
    assert b.labels == LABELS and b.lm is not None
    with pytest.raises(ArtifactError, match="missing.json: tokenizer not found"):
        load_parts(p.tokenizer / "missing.json", p.classifier)


# (file in the bundle, what happens to it, the error after the file name)
WITH_MANIFEST = [
    ("classifier/model.safetensors", truncate, r"truncated \(\d+ bytes, \d+ expected\)"),
    ("classifier/model.safetensors", flip_byte, r"corrupt \(sha256 mismatch\)"),
    ("lm/model.safetensors", flip_byte, "corrupt"),
    ("lm/config.json", delete, "missing"),
    ("tokenizer.json", truncate, "truncated"),
    ("tokenizer.json", append, "wrong size"),
    ("classifier/config.json", garbage, "truncated"),
    ("manifest.json", garbage, "not valid JSON"),
]
WITHOUT_MANIFEST = [  # older bundles: what cannot be read is still one error naming the file
    ("classifier/model.safetensors", truncate, "not a readable safetensors file"),
    ("lm/model.safetensors", delete, "missing"),
    ("classifier/config.json", garbage, "not valid JSON"),
    ("lm/config.json", delete, "model config not found"),
    ("tokenizer.json", truncate, "not a readable tokenizer"),
    ("tokenizer.json", delete, "tokenizer not found"),
]


@pytest.mark.parametrize(
    "manifest,file,corrupt,problem",
    [(True, *case) for case in WITH_MANIFEST] + [(False, *case) for case in WITHOUT_MANIFEST],
    ids=[f"manifest-{f}-{c.__name__}" for f, c, _ in WITH_MANIFEST]
    + [f"old-{f}-{c.__name__}" for f, c, _ in WITHOUT_MANIFEST],
)
def test_a_broken_bundle_raises_one_error_naming_the_file(bundle_dir, tmp_path, manifest, file, corrupt, problem):
    b = shutil.copytree(bundle_dir, tmp_path / "b")
    if not manifest:
        (b / "manifest.json").unlink()
    corrupt(b / file)
    with pytest.raises(ArtifactError) as e:
        load_bundle(b)
    assert e.value.file == b / file and re.match(problem, e.value.problem), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bundle_without_a_manifest_loads_unchecked(bundle_dir, tmp_path):
    b = shutil.copytree(bundle_dir, tmp_path / "b")
    (b / "manifest.json").unlink()
    f = b / "classifier" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # the last bit of the last weight: nothing can notice without a manifest
    f.write_bytes(bytes(data))
    assert load_bundle(b).labels == LABELS


def test_a_missing_bundle_folder_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such bundle folder"):
        load_bundle(tmp_path / "nope")


def test_service_loads_a_local_bundle(bundle_dir):
    from deploy.core import generate
    from deploy.requests import EXAMPLE_INPUT, EXAMPLE_PROMPT, GenerationRequest
    from deploy.resolve import load_service_bundle, open_model

    b = load_service_bundle(str(bundle_dir))
    assert isinstance(b, Bundle) and b.labels == LABELS
    preds = b.classify(EXAMPLE_INPUT)
    assert len(preds) == len(EXAMPLE_INPUT)
    assert all(abs(sum(x.probabilities.values()) - 1) < 1e-3 for x in preds)
    served = open_model(str(bundle_dir), to_store=False)
    assert isinstance(generate(served, GenerationRequest(EXAMPLE_PROMPT, max_new_tokens=8, seed=0)).text, str)
