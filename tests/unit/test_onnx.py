"""ONNX export and the ONNX Runtime classifier: ORT reproduces PyTorch, through load_classifier and Bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.testing import assert_close

import models
from models.bundle import load_parts, write_bundle
from models.checkpoint import ArtifactError, load_classifier, save_classifier, save_lm, save_quantized
from models.classifier import ClassifierConfig, TransformerClassifier
from models.onnx_export import (
    EXPORT_FILES,
    export_classifier,
    export_lm,
    export_onnx,
    write_onnx_classifier,
    write_onnx_int8,
)
from models.onnx_runtime import GRAPH, SHORT_GRAPH, OnnxClassifier, cpu_session, graph_weights
from models.quantize import quantize_classifier
from models.tokenizer import TOKENIZER_FILE
from models.transformer import GPT, tiny
from tasks.tokenize import train_tokenizer

LABELS = ["a", "b", "c"]
VOCAB = 320
"""Room for the byte-level tokenizer the bundle tests train (256 bytes + special tokens + merges)."""
WINDOWED = {"block_size": 64, "attn_window": 16, "attn_global": 1, "attn_chunked": True}
"""The default classifier's attention in small: chunks of 16 with a global first token, 64 positions."""


def classifier(seed: int = 0, pooling: str = "mean", **trunk) -> TransformerClassifier:
    torch.manual_seed(seed)
    return TransformerClassifier(ClassifierConfig(tiny(vocab_size=VOCAB, **trunk), LABELS, pooling)).eval()


def batch(B: int, T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return ids, lengths


def ort_logits(graph, ids: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    (out,) = cpu_session(graph, threads=1).run(["logits"], {"input_ids": ids.numpy(), "lengths": lengths.numpy()})
    return out


@pytest.mark.parametrize(
    "shape",
    [
        {"attn_global": 1, "attn_chunked": True},
        {"attn_global": 2},
        {"attn_global": 1, "attn_global_last": True},
        {"attn_global": 0, "causal": False},
        {"attn_global": 1, "causal": False, "attn_chunked": True},
    ],
)
def test_export_mode_is_exact_in_eager(shape):
    """The traced attention (blocked kernel for every length, or the dense mask) equals the eager paths."""
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, block_size=40, attn_window=4, **shape)).double().eval()
    traced = GPT(m.config).double().eval()
    traced.load_state_dict(m.state_dict())
    traced.traceable = True
    for T in (3, 8, 40):
        idx, lengths = torch.randint(0, 64, (3, T)), torch.tensor([T, max(1, T // 2), 1])
        rows = torch.arange(T)[None] < lengths[:, None]  # padded rows of a causal trunk are never read
        want = m.hidden(idx, lengths)[rows]
        torch.testing.assert_close(traced.hidden(idx, lengths)[rows], want, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def onnx_folders(tmp_path_factory):
    """The windowed classifier as `onnx` folders, fp32 and int8, beside its PyTorch folder and a tokenizer."""
    root = tmp_path_factory.mktemp("variants")
    model = classifier(**WINDOWED)
    save_classifier(model, root / "fp32", extra={"max_length": 64})
    (root / "onnx").mkdir()
    write_onnx_classifier(model, root / "onnx", extra={"max_length": 64, "variant": "onnx"})
    (root / "onnx-int8").mkdir()
    write_onnx_int8(root / "onnx", root / "onnx-int8", extra={"variant": "onnx-int8"})
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20, VOCAB, 1)
    tok.save(str(root / TOKENIZER_FILE))
    return root, model


@pytest.mark.parametrize(("B", "T"), [(1, 16), (3, 48), (2, 64)])
def test_windowed_classifier_matches_pytorch(onnx_folders, B, T):
    """Two batch sizes and lengths within one chunk and past two (the eager blocked kernel's range)."""
    root, model = onnx_folders
    graph = root / "onnx" / GRAPH
    assert json.loads((root / "onnx" / "config.json").read_text())["length_multiple"] == 16
    ids, lengths = batch(B, T)
    with torch.no_grad():
        want = model(ids, lengths).numpy()
    np.testing.assert_allclose(ort_logits(graph, ids, lengths), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("B", "T"), [(1, 1), (1, 7), (3, 16)])
def test_short_graph_matches_pytorch_unpadded(onnx_folders, B, T):
    """The graph for T <= window takes any T (no padding to the window) and equals the eager model."""
    root, model = onnx_folders
    assert json.loads((root / "onnx" / "config.json").read_text())["short_graph"] == SHORT_GRAPH
    ids, lengths = batch(B, T)
    with torch.no_grad():
        want = model(ids, lengths).numpy()
    np.testing.assert_allclose(ort_logits(root / "onnx" / SHORT_GRAPH, ids, lengths), want, atol=1e-4, rtol=0)


def test_short_graph_of_a_bidirectional_trunk(tmp_path):
    """Padding keys are masked in the short graph too (bidirectional, chunked, global first token)."""
    model = classifier(causal=False, **WINDOWED)
    write_onnx_classifier(model, tmp_path, extra={"max_length": 64})
    loaded = load_classifier(tmp_path)
    assert loaded.short is not None
    for B, T in ((3, 9), (2, 40)):
        ids, lengths = batch(B, T)
        assert_close(loaded(ids, lengths), model(ids, lengths).detach(), atol=1e-4, rtol=0)


def test_windowed_graph_has_dynamic_axes(onnx_folders):
    graph = onnx_folders[0] / "onnx" / GRAPH
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(graph).graph.input
    }
    assert set(inputs) == {"input_ids", "lengths"}
    assert all(isinstance(d, str) for d in inputs["input_ids"] + inputs["lengths"])


def test_graphs_name_no_source_file(onnx_folders):
    """The exporter's stack traces name the code's absolute paths: stripped, so a rebuild elsewhere (lmforge verify)
    writes the same bytes."""
    root, _ = onnx_folders
    code_dir = str(Path(models.__file__).resolve().parent).encode()
    for folder in ("onnx", "onnx-int8"):
        for graph in (root / folder).glob("*.onnx"):
            data = graph.read_bytes()
            assert code_dir not in data and b"stack_trace" not in data, graph
            assert not any(node.metadata_props for node in onnx.load(graph).graph.node), graph


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_dense_classifier_matches_pytorch(tmp_path, pooling):
    """No window (the dense causal path) and any length, not only multiples."""
    model = classifier(pooling=pooling)
    assert export_classifier(model, tmp_path / GRAPH, tmp_path / SHORT_GRAPH) == 1
    assert not (tmp_path / SHORT_GRAPH).exists()  # the one graph takes every T
    for B, T in ((1, 5), (4, 32)):
        ids, lengths = batch(B, T)
        with torch.no_grad():
            want = model(ids, lengths).numpy()
        np.testing.assert_allclose(ort_logits(tmp_path / GRAPH, ids, lengths), want, atol=1e-4, rtol=0)


def test_lm_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=VOCAB)).eval()
    assert export_lm(lm, tmp_path / "lm.onnx") == 1
    for B, T in ((1, 7), (2, 32)):
        ids, lengths = batch(B, T)
        with torch.no_grad():
            want = lm(ids)[0][..., :VOCAB].numpy()
        np.testing.assert_allclose(ort_logits(tmp_path / "lm.onnx", ids, lengths), want, atol=1e-4, rtol=0)


def test_int8_exported_model_not_exported():
    with pytest.raises(TypeError, match="only a float Transformer classifier"):
        export_classifier(quantize_classifier(classifier()), "unused.onnx")


def test_load_classifier_gives_an_ort_module(onnx_folders):
    root, model = onnx_folders
    loaded = load_classifier(root / "onnx")
    assert isinstance(loaded, OnnxClassifier) and not loaded.training
    assert loaded.config == model.config and loaded.length_multiple == 16
    ids, lengths = batch(3, 40)  # not a multiple of 16: padded inside
    assert_close(loaded(ids, lengths), model(ids, lengths).detach(), atol=1e-4, rtol=0)
    assert loaded.short is not None and load_classifier(root / "onnx-int8").short is not None


def test_bundle_runs_onnx_variants(onnx_folders, tmp_path):
    root, _ = onnx_folders
    texts = ["def f(x):\n    return x", "class A:\n    pass", "x = 1\n" * 40]
    want = load_parts(root / TOKENIZER_FILE, root / "fp32").probabilities(texts)
    for name, atol in (("onnx", 1e-5), ("onnx-int8", 0.05)):  # int8: activations rounded to 8 bits per batch
        bundle = load_parts(root / TOKENIZER_FILE, root / name)
        assert bundle.variant == name and bundle.labels == LABELS
        assert_close(bundle.probabilities(texts), want, atol=atol, rtol=0)
    write_bundle(tmp_path / "b", root / TOKENIZER_FILE, root / "onnx-int8", None)  # the folder copies as is
    files = json.loads((tmp_path / "b" / "manifest.json").read_text())["files"]
    assert set(files) >= {"classifier/model.onnx", "classifier/short.onnx"}


def test_int8_graph_is_smaller_and_described(onnx_folders):
    root, _ = onnx_folders
    meta = json.loads((root / "onnx-int8" / "config.json").read_text())
    assert meta["kind"] == "onnx" and meta["quantization"]["weights"] == "int8 per channel"
    assert json.loads((root / "onnx" / "config.json").read_text())["quantization"] is None
    for graph in (GRAPH, SHORT_GRAPH):
        assert (root / "onnx-int8" / graph).stat().st_size < (root / "onnx" / graph).stat().st_size
    assert graph_weights(root / "onnx-int8" / GRAPH) == graph_weights(root / "onnx" / GRAPH)


def test_export_onnx_of_a_bundle(onnx_folders, tmp_path):
    root, model = onnx_folders
    torch.manual_seed(0)
    save_lm(GPT(tiny(vocab_size=VOCAB)), tmp_path / "lm")
    write_bundle(tmp_path / "bundle", root / TOKENIZER_FILE, root / "fp32", tmp_path / "lm")
    (tmp_path / "out").mkdir()
    files = export_onnx(tmp_path / "bundle", tmp_path / "out")
    assert sorted(f.name for f in files) == sorted(EXPORT_FILES)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["labels"] == LABELS and config["classifier"]["length_multiple"] == 16
    ids, lengths = batch(2, 32)
    np.testing.assert_allclose(
        ort_logits(tmp_path / "out" / "classifier.onnx", ids, lengths), model(ids, lengths).detach().numpy(), atol=1e-4
    )


def test_broken_graph_is_one_line(onnx_folders, tmp_path):
    root, _ = onnx_folders
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((root / "onnx" / "config.json").read_text())
    (folder / GRAPH).write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="model.onnx: not a loadable ONNX graph"):
        load_classifier(folder)
    (folder / GRAPH).unlink()
    with pytest.raises(ArtifactError, match="model.onnx: missing"):
        load_classifier(folder)


def test_onnx_stage_writes_variants_that_evaluate_finds(onnx_folders, tmp_path):
    import pandas as pd
    from conftest import make_paths

    from tasks import onnx as onnx_stage
    from tasks.shared.config.onnx import OnnxConfig
    from tasks.shared.errors import UserError
    from tasks.shared.scoring import stored_weights
    from tasks.shared.variants import built

    root, model = onnx_folders
    paths = make_paths(tmp_path)
    save_classifier(model, paths.classifier, extra={"max_length": 64})
    paths.tokenizer.mkdir(parents=True)
    (paths.tokenizer / TOKENIZER_FILE).write_text((root / TOKENIZER_FILE).read_text())
    paths.clean_labeled.parent.mkdir(parents=True, exist_ok=True)
    texts = ["def f(x):\n    return x", "class A:\n    pass " * 30, "x = 1"]
    pd.DataFrame({"text": texts, "label": LABELS, "split": ["val", "val", "test"]}).to_parquet(paths.clean_labeled)
    result = onnx_stage.run(OnnxConfig(sources=["fp32"], check_rows=2), paths)
    assert set(result.variants) == {"onnx", "onnx-int8"}
    assert result.variants["onnx"]["max_logit_diff"] < 1e-4 and result.variants["onnx"]["agreement"] == 1.0
    assert result.variants["onnx-int8"]["source"] == "fp32" and result.variants["onnx-int8"]["max_logit_diff"] < 0.1
    assert {"fp32", "onnx", "onnx-int8"} <= set(built(paths))
    assert load_parts(paths.tokenizer / TOKENIZER_FILE, built(paths)["onnx-int8"]).variant == "onnx-int8"
    assert stored_weights(built(paths)["onnx"]) == pytest.approx(stored_weights(paths.classifier), rel=0.02)
    save_quantized(quantize_classifier(model), model.config, paths.pruned, "torch.ao", True)
    with pytest.raises(UserError, match="onnx.sources: pruned .* is not a float Transformer classifier"):
        onnx_stage.source_models(OnnxConfig(sources=["pruned"]), paths)
