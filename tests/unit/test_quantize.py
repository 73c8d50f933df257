"""int8 with two backends: one plain-tensor format, exact round trips, cross-backend loads, loud failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from models import checkpoint as ckpt
from models import quantize as quant
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import tiny

VOCAB = 300
ROOT = Path(__file__).resolve().parents[2]


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 24), generator=g)
    return ids, torch.tensor([24, 10, 3, 17])


@pytest.fixture
def clf() -> TransformerClassifier:
    torch.manual_seed(0)
    m = TransformerClassifier(
        ClassifierConfig(trunk=tiny(vocab_size=VOCAB, bias=True), labels=["db", "net", "ui"], pooling="mean")
    )
    torch.nn.init.normal_(m.head.weight, std=0.5)
    return m.eval()


def _save(clf, folder, backend="torch.ao", per_channel=True, **extra):
    ckpt.save_quantized(
        quant.quantize_classifier(clf, backend, per_channel), clf.config, folder, backend, per_channel, extra=extra
    )
    return folder


def _edit_config(folder, edit) -> None:
    f = folder / ckpt.CONFIG
    meta = json.loads(f.read_text())
    edit(meta)
    f.write_text(json.dumps(meta))


def _edit_tensors(folder, edit) -> None:
    f = folder / ckpt.WEIGHTS
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("backend", quant.BACKENDS)
def test_int8_round_trip_matches_in_memory_quantized_model(tmp_path, clf, backend, per_channel):
    qmodel = quant.quantize_classifier(clf, backend, per_channel)
    ckpt.save_classifier(clf, tmp_path / "fp32")
    ckpt.save_quantized(qmodel, clf.config, tmp_path / "int8", backend, per_channel, extra={"max_length": 24})
    loaded = ckpt.load_classifier(tmp_path / "int8")
    assert not loaded.training
    ids, n = _batch()
    with torch.inference_mode():
        expected = qmodel(ids, n)
        assert_close(loaded(ids, n), expected, rtol=0, atol=0)
        # quantization approximates the float model without changing its decisions much
        assert_close(expected, clf(ids, n), rtol=0.1, atol=0.05)
    meta = ckpt.read_config(tmp_path / "int8")
    assert meta["kind"] == "classifier-int8" and meta["backend"] == backend
    assert meta["per_channel"] is per_channel and meta["max_length"] == 24
    assert ckpt.dir_size_mb(tmp_path / "int8") < ckpt.dir_size_mb(tmp_path / "fp32")


@pytest.mark.parametrize("backend", quant.BACKENDS)
def test_quantize_leaves_the_float_model_alone(clf, backend):
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    quant.quantize_classifier(clf, backend)
    assert isinstance(clf.trunk.lm_head, torch.nn.Linear) and type(clf.head.weight) is torch.nn.Parameter
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("backend", quant.BACKENDS)
def test_int8_folder_holds_only_plain_tensors(tmp_path, clf, backend):
    _save(clf, tmp_path / "int8", backend)
    _save(clf, tmp_path / "int8-tensor", backend, per_channel=False)
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == [ckpt.CONFIG, ckpt.WEIGHTS]
    tensors = load_file(str(tmp_path / "int8" / ckpt.WEIGHTS))  # safetensors: no code execution possible
    int8 = {k for k, t in tensors.items() if t.dtype == torch.int8}
    assert int8 and all(k.endswith(".weight_int8") for k in int8)
    assert "head.weight_int8" in int8 and "trunk.blocks.0.attn.qkv.weight_int8" in int8
    assert tensors["trunk.blocks.0.attn.qkv.weight_int8"].shape == (48, 16)  # out x in
    assert tensors["trunk.blocks.0.attn.qkv.weight_scale"].shape == (48,)  # one scale per output channel
    assert tensors["trunk.blocks.0.attn.qkv.weight_scale"].dtype == torch.float32
    assert tensors["trunk.blocks.0.attn.qkv.weight_zero_point"].dtype == torch.int32
    assert tensors["trunk.blocks.0.attn.qkv.bias"].dtype == torch.float32
    assert tensors["trunk.wte.weight"].dtype == torch.float32  # embeddings stay float
    assert not any(k.startswith("trunk.lm_head") for k in tensors)
    assert all(type(t) is torch.Tensor for t in tensors.values())
    per_tensor = load_file(str(tmp_path / "int8-tensor" / ckpt.WEIGHTS))
    assert (
        per_tensor["trunk.blocks.0.attn.qkv.weight_scale"].shape
        == per_tensor["trunk.blocks.0.attn.qkv.weight_zero_point"].shape
        == (1,)
    )
    json.loads((tmp_path / "int8" / ckpt.CONFIG).read_text())  # config is plain JSON


@pytest.mark.parametrize("per_channel", [True, False])
def test_both_backends_write_the_same_int8_weights(tmp_path, clf, per_channel):
    a, b = (load_file(str(_save(clf, tmp_path / be, be, per_channel) / ckpt.WEIGHTS)) for be in quant.BACKENDS)
    assert sorted(a) == sorted(b)
    for k in a:
        if k.endswith(".weight_int8"):  # rounding of a value exactly between two steps may differ
            assert (a[k].int() - b[k].int()).abs().max() <= 1, k
        else:
            assert_close(a[k], b[k], rtol=1e-6, atol=0, msg=k)


@pytest.mark.parametrize("writer,reader", [("torch.ao", "torchao"), ("torchao", "torch.ao")])
def test_a_folder_written_with_one_backend_loads_with_the_other(tmp_path, clf, writer, reader):
    folder = _save(clf, tmp_path / "int8", writer)
    loaded = ckpt.load_quantized(folder, backend=reader)
    assert quant.int8_backend(loaded.head) == reader
    ids, n = _batch()
    with torch.inference_mode():  # same weights; activations are quantized differently (per tensor / per token)
        assert_close(loaded(ids, n), ckpt.load_classifier(folder)(ids, n), rtol=0.05, atol=0.02)
    ckpt.save_quantized(loaded, clf.config, tmp_path / "again", reader, per_channel=True)
    before, after = (load_file(str(f / ckpt.WEIGHTS)) for f in (folder, tmp_path / "again"))
    assert sorted(before) == sorted(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_a_folder_from_before_backends_loads_with_torch_ao(tmp_path, clf):
    folder = _save(clf, tmp_path / "int8", "torch.ao")
    _edit_config(folder, lambda m: m.pop("backend"))
    assert quant.int8_backend(ckpt.load_classifier(folder).head) == "torch.ao"


def test_bad_backends_raise(tmp_path, clf):
    with pytest.raises(ValueError, match="int8 backend must be one of"):
        quant.quantize_classifier(clf, "onnx")
    with pytest.raises(ValueError, match="no int8 Linear"):
        ckpt.save_quantized(clf, clf.config, tmp_path / "float", "torch.ao", per_channel=True)
    folder = _save(clf, tmp_path / "int8")
    _edit_config(folder, lambda m: m.update(backend="onnx"))
    with pytest.raises(ckpt.ArtifactError, match="config.json: unknown int8 backend 'onnx'"):
        ckpt.load_classifier(folder)


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    return lambda t: t.update({key: value})


QKV = "trunk.blocks.0.attn.qkv"
# (what happens to the stored tensors, what the error says)
BROKEN_TENSORS = [
    ("no-scale", _drop("head.weight_scale"), r"weights do not match config \(missing \['head.weight_scale'\]\)"),
    ("no-zero-point", _drop(f"{QKV}.weight_zero_point"), rf"missing \['{QKV}.weight_zero_point'\]"),
    ("no-bias", _drop(f"{QKV}.bias"), rf"{QKV}.bias is missing, config says \(48,\)"),
    ("no-embedding", _drop("trunk.wte.weight"), r"missing \['trunk.wte.weight'\]"),
    ("extra-tensor", _set("trunk.extra", torch.zeros(2)), r"unexpected \['trunk.extra'\]"),
    (
        "int8-shape",
        _set(f"{QKV}.weight_int8", torch.zeros(48, 8, dtype=torch.int8)),
        r"weight_int8 is int8 \(48, 8\), config says int8 \(48, 16\)",
    ),
    ("int8-dtype", _set(f"{QKV}.weight_int8", torch.zeros(48, 16)), rf"{QKV}.weight_int8 is float32 \(48, 16\)"),
    (
        "scale-shape",
        _set(f"{QKV}.weight_scale", torch.ones(47)),
        rf"{QKV}.weight_scale is \(47,\), per-channel int8 needs \(48,\)",
    ),
    (
        "zero-scale",
        _set(f"{QKV}.weight_scale", torch.zeros(48)),
        rf"{QKV}.weight_scale holds zero, negative or non-finite scales",
    ),
    ("nan-scale", _set(f"{QKV}.weight_scale", torch.full((48,), float("nan"))), "non-finite scales"),
    (
        "zero-point-range",
        _set(f"{QKV}.weight_zero_point", torch.full((48,), 200, dtype=torch.int32)),
        rf"{QKV}.weight_zero_point holds values outside the int8 range",
    ),
    ("bias-shape", _set(f"{QKV}.bias", torch.zeros(47)), rf"{QKV}.bias is \(47,\), config says \(48,\)"),
    (
        "embedding-shape",
        _set("trunk.wpe.weight", torch.zeros(31, 16)),
        r"trunk.wpe.weight is \(31, 16\), config says \(32, 16\)",
    ),
]


@pytest.mark.parametrize("backend", quant.BACKENDS)
@pytest.mark.parametrize("edit,problem", [b[1:] for b in BROKEN_TENSORS], ids=[b[0] for b in BROKEN_TENSORS])
def test_a_missing_or_misshaped_tensor_raises_naming_the_file(tmp_path, clf, backend, edit, problem):
    folder = _save(clf, tmp_path / "int8", backend)
    _edit_tensors(folder, edit)
    with pytest.raises(ckpt.ArtifactError, match=problem) as e:
        ckpt.load_classifier(folder)
    assert e.value.file == folder / ckpt.WEIGHTS and "\n" not in str(e.value)


def test_asymmetric_weights_do_not_load_with_torchao(tmp_path, clf):
    folder = _save(clf, tmp_path / "int8", "torch.ao")
    _edit_tensors(folder, _set(f"{QKV}.weight_zero_point", torch.ones(48, dtype=torch.int32)))
    with pytest.raises(ckpt.ArtifactError, match=f"{QKV}.weight_zero_point is not all zero"):
        ckpt.load_quantized(folder, backend="torchao")


def test_scales_that_do_not_reproduce_the_int8_values_raise(tmp_path, clf):
    """torch.ao quantizes the stored values again on load: scales so large that they overflow cannot give them back."""
    folder = _save(clf, tmp_path / "int8", "torch.ao")
    _edit_tensors(folder, _set(f"{QKV}.weight_scale", torch.full((48,), 1e38)))
    with pytest.raises(ckpt.ArtifactError, match=f"{QKV}.weight_scale and {QKV}.weight_zero_point do not reproduce"):
        ckpt.load_classifier(folder)


@pytest.mark.parametrize("backend", quant.BACKENDS)
@pytest.mark.parametrize(
    "edit,problem",
    [
        (
            lambda m: m["config"]["trunk"].update(n_layer=3),
            "weights do not match .*blocks.2",
        ),  # names the missing tensor
        (lambda m: m["config"]["trunk"].update(block_size=64), "trunk.wpe.weight is"),  # (32, 16) cannot fill (64, 16)
        (
            lambda m: m["config"].update(labels=["a", "b", "c", "d"]),
            "head.weight_int8 is int8 \\(3, 16\\), config says int8 \\(4, 16\\)",
        ),
        (lambda m: m.update(per_channel=False), "weight_scale is \\(48,\\), per-tensor int8 needs \\(1,\\)"),
        (lambda m: m.update(per_channel="yes"), "config.json: per_channel 'yes' is not true or false"),
    ],
    ids=["more-layers", "longer-context", "more-labels", "per-tensor", "per-channel-not-bool"],
)
def test_config_that_disagrees_with_weights_raises(tmp_path, clf, backend, edit, problem):
    folder = _save(clf, tmp_path / "int8", backend)
    _edit_config(folder, edit)
    with pytest.raises(ckpt.ArtifactError, match=problem):
        ckpt.load_classifier(folder)


def test_linear_weight_bytes_counts_int8_values_and_scales(clf):
    linears = [m for n, m in clf.named_modules() if isinstance(m, torch.nn.Linear) and n != "trunk.lm_head"]
    values, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    assert quant.linear_weight_bytes(clf) == 4 * values  # the tied LM head is the embedding, not counted
    for backend in quant.BACKENDS:
        assert quant.linear_weight_bytes(quant.quantize_classifier(clf, backend)) == values + 4 * rows
        assert quant.linear_weight_bytes(
            quant.quantize_classifier(clf, backend, per_channel=False)
        ) == values + 4 * len(linears)


def test_time_forward_is_a_median_in_ms(clf):
    ms = quant.time_forward(clf, _batch(), reps=3, warmup=1)
    assert 0 < ms < 10_000


def test_pick_backend_times_every_backend(clf):
    ids, n = _batch()
    choice = quant.pick_backend(clf, ids, n, per_channel=True, reps=2)
    assert choice.backend in quant.BACKENDS and sorted(choice.ms) == sorted(quant.BACKENDS) and not choice.errors
    assert choice.ms[choice.backend] == min(choice.ms.values()) and all(ms > 0 for ms in choice.ms.values())
    assert choice.backend in choice.reason and "ms" in choice.reason


def test_pick_backend_falls_back_to_torch_ao_when_torchao_fails(clf, monkeypatch):
    def broken():
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(quant, "_torchao", broken)
    ids, n = _batch()
    backend, ms, errors = quant.pick_backend(clf, ids, n, per_channel=True, reps=1)
    assert backend == "torch.ao" and list(ms) == ["torch.ao"]
    assert errors == {"torchao": "ImportError: No module named 'torchao'"}
    assert "torchao failed: ImportError" in quant.BackendChoice(backend, ms, errors).reason


def test_no_private_torch_constructors_remain():
    sources = sorted((ROOT / "models").glob("*.py")) + sorted((ROOT / "tasks").rglob("*.py"))
    assert [f.name for f in sources if "torch._make_" in f.read_text()] == []


@pytest.mark.slow
def test_importing_torchao_prints_nothing():
    """A stage log must not show torchao's missing-CUDA-kernel and pytree lines on a CPU machine."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "from models.quantize import _torchao; _torchao(); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "ok" and out.stderr == ""
