"""ONNX export of lmforge models, ONNX Runtime int8 quantization, and the `onnx` classifier folder.

`export_classifier` and `export_lm` trace a copy of the model with `torch.onnx.export(..., dynamo=True)` at opset
23 (its `Attention` op: ONNX Runtime ran it about 2x faster than opset 18's decomposed softmax attention on the
default classifier) with dynamic batch and length axes. The copy is put in export mode (`GPT.traceable`): attention
masks come from tensor ops for every length, the blocked sparse kernel included, exact against the eager model
(`models.transformer.attention_pattern`). A trunk with a window that tiles block_size exports the blocked kernel,
whose input length must be a multiple of the window: `length_multiple` in the config says so, and
`models.onnx_runtime.OnnxClassifier` pads to it (a user of the bare graph pads the ids the same way; any id does).

Inputs `input_ids` (int64 B x T) and `lengths` (int64 B, real lengths of right-padded rows); output `logits`
(classifier: B x K, LM: B x T x vocab_size). The LM graph has no past key/values input: it recomputes the
prefix (the KV cache is not exported).

`quantize_int8` is ONNX Runtime's dynamic quantization (`quantize_dynamic`) of the exported graph: every MatMul and
Gemm weight int8 per output channel, activations quantized per batch at run time, the embedding tables (Gather)
int8 too. The attention products (opset-23 `Attention`, no weights) and GELU stay float: ORT's quantizer has
integer kernels only for its own fused `com.microsoft.Attention` (QAttention), which this graph does not use.
Static quantization (`quantize_static`, QDQ or QOperator, activations calibrated on train rows) was measured and
lost: at 1 thread on the default fp32 classifier batch 32 took 780-805 ms against dynamic's 567 (PyTorch 688),
batch 1 1.31-1.84 ms against 1.23, at the same macro-F1 (within 0.4 point); on the distilled student it was within
noise of dynamic. The other operators dynamic quantization knows (Conv, LSTM, contrib Attention) are not in the
graph, so there is no op type left to add.

A windowed trunk is written as two graphs (`export_classifier(short=)`): the blocked kernel for any length (padded
to a multiple of the window) and a plain-attention graph for inputs of at most one window, which most texts of the
default data are. Each graph stores the weights: the folder is about twice the size of one graph.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from onnxruntime.quantization import QuantType, quantize_dynamic

from models.checkpoint import CONFIG, load_classifier, load_lm, read_config
from models.classifier import TransformerClassifier
from models.onnx_runtime import GRAPH, INPUTS, ONNX_KIND, OUTPUT, SHORT_GRAPH, OnnxClassifier
from models.quantize import int8_linears
from models.tokenizer import TOKENIZER_FILE
from models.transformer import GPT, GPTConfig, blocked_export

OPSET = 23
INT8_OPS = ("MatMul", "Gemm", "Gather")
"""Operators whose weights `quantize_int8` stores in int8."""
EXPORT_FILES = ("classifier.onnx", "lm.onnx", TOKENIZER_FILE, CONFIG)
"""What `export_onnx` writes into its output folder."""


def length_multiple(trunk: GPTConfig) -> int:
    """The multiple of which an exported trunk's input length must be (1: any length)."""
    return trunk.attn_window if blocked_export(trunk) else 1


def short_trunk(trunk: GPTConfig) -> GPTConfig | None:
    """The trunk as it attends over at most one window (T <= attn_window): no window and no global positions,
    since the window covers every pair; None when the trunk exports no blocked kernel (its graph takes any T)."""
    if not blocked_export(trunk):
        return None
    return dataclasses.replace(
        trunk, block_size=trunk.attn_window, attn_window=0, attn_global=0, attn_chunked=False, attn_global_last=False
    )


class _LMLogits(nn.Module):
    """The LM's logits over its real vocabulary, called with (input_ids, lengths) like the classifier."""

    def __init__(self, lm: GPT) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm(input_ids, lengths=lengths)  # (B, T, padded vocab)
        return logits[..., : self.lm.config.vocab_size]


def _trace(module: nn.Module, trunk: GPTConfig, path: Path) -> None:
    """Export `module(input_ids, lengths)` to `path` with dynamic batch and length axes (one file, no external
    data)."""
    multiple = length_multiple(trunk)
    top = trunk.block_size // multiple
    blocks = min(3, top)  # an example of several blocks, so no size is specialised to 1
    T = blocks * multiple if multiple > 1 else min(trunk.block_size, 17)
    ids = torch.randint(0, trunk.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))  # global RNG untouched
    lengths = torch.tensor([T, T // 2 + 1])
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = (
        multiple * torch.export.Dim("blocks", min=1, max=top)
        if multiple > 1
        else torch.export.Dim("length", min=1, max=trunk.block_size)
    )
    torch.onnx.export(
        module,
        (ids, lengths),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_shapes=({0: batch, 1: length}, {0: batch}),
        external_data=False,
        optimize=True,
        verbose=False,
    )
    strip_source_locations(path)


def strip_source_locations(path: Path) -> None:
    """Drop the exporter's per-node metadata and doc strings (stack traces naming the absolute paths of the source
    files, name scopes) from the graph at `path`: its bytes then depend on the model alone, not on where the code
    lay, so `lmforge verify` rebuilding in another folder gets the same file."""
    proto = onnx.load(str(path))

    def clean(nodes) -> None:
        for node in nodes:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    clean(graph.node)

    clean(proto.graph.node)
    for function in proto.functions:
        clean(function.node)
    onnx.save(proto, str(path))


def export_classifier(model: TransformerClassifier, path: Path, short: Path | None = None) -> int:
    """Write Transformer classifier `model` as an ONNX graph to `path`; its `length_multiple`.

    With `short`, a trunk with the blocked kernel (`length_multiple` > 1) is also written there as a graph for inputs
    of at most one window: plain attention, any T up to `length_multiple`, no padding (`short_trunk`; exact, and at
    batch 1 several times faster than padding a short text to the window). Otherwise `short` is not written.

    Raises:
        TypeError: `model` is not a float TransformerClassifier (int8 or CNN/GRU baselines are not exported).
    """
    if type(model) is not TransformerClassifier or int8_linears(model):
        what = "an int8 one" if int8_linears(model) else type(model).__name__
        raise TypeError(f"only a float Transformer classifier exports to ONNX, not {what}")
    traced = copy.deepcopy(model).eval()  # export mode on a copy: the caller's model keeps its fast eager path
    traced.trunk.traceable = True
    with torch.no_grad():
        _trace(traced, model.config.trunk, Path(path))
        plain = short_trunk(model.config.trunk)
        if short is not None and plain is not None:
            traced.trunk.config = traced.config.trunk = plain
            _trace(traced, plain, Path(short))
    return length_multiple(model.config.trunk)


def export_lm(lm: GPT, path: Path) -> int:
    """Write language model `lm` (logits for every position, no KV cache) as an ONNX graph to `path`; its
    `length_multiple`."""
    traced = copy.deepcopy(lm).eval()
    traced.traceable = True
    with torch.no_grad():
        _trace(_LMLogits(traced).eval(), lm.config, Path(path))
    return length_multiple(lm.config)


def quantize_int8(source: Path, target: Path, per_channel: bool = True) -> dict:
    """ONNX Runtime dynamic int8 quantization of graph `source` into `target` (module docstring); its
    description for config.json."""
    quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=list(INT8_OPS),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )
    scales = "per channel" if per_channel else "per tensor"
    return {"method": "onnxruntime.quantize_dynamic", "weights": f"int8 {scales}", "ops": list(INT8_OPS)}


def write_onnx_classifier(model: TransformerClassifier, folder: Path, extra: dict | None = None) -> None:
    """Fill existing `folder` with `model` exported as a classifier of kind `onnx` (models/onnx_runtime.py);
    `extra` entries (max_length, lineage) go into config.json."""
    folder = Path(folder)
    multiple = export_classifier(model, folder / GRAPH, folder / SHORT_GRAPH)
    meta = {
        "kind": ONNX_KIND,
        "config": model.config.to_dict(),
        **(extra or {}),
        "graph": GRAPH,
        "short_graph": SHORT_GRAPH if (folder / SHORT_GRAPH).is_file() else None,
        "length_multiple": multiple,
        "opset": OPSET,
        "quantization": None,
    }
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))


def write_onnx_int8(fp32_folder: Path, folder: Path, per_channel: bool = True, extra: dict | None = None) -> None:
    """Fill existing `folder` with the int8 quantization (`quantize_int8`) of fp32 `onnx` folder `fp32_folder`;
    `extra` entries replace config.json's (variant name, source)."""
    meta = read_config(fp32_folder)
    quantization = quantize_int8(Path(fp32_folder) / meta.get("graph", GRAPH), Path(folder) / GRAPH, per_channel)
    short = meta.get("short_graph")
    if short:
        quantize_int8(Path(fp32_folder) / short, Path(folder) / SHORT_GRAPH, per_channel)
    meta = {**meta, **(extra or {}), "graph": GRAPH, "short_graph": SHORT_GRAPH if short else None}
    meta["quantization"] = quantization
    (Path(folder) / CONFIG).write_text(json.dumps(meta, indent=2))


def export_onnx(bundle_folder: Path, out: Path) -> list[Path]:
    """Export a bundle folder (models/bundle.py: tokenizer.json, classifier/, lm/) as ONNX into existing `out`:
    classifier.onnx, lm.onnx (when the bundle has an LM), tokenizer.json and config.json (labels, pooling,
    max_length, length_multiple, inputs and outputs). A classifier that is already of kind `onnx` is copied.

    Returns:
        The files written.

    Raises:
        TypeError: the classifier is int8 (PyTorch) or a CNN/GRU baseline.
    """
    bundle_folder, out = Path(bundle_folder), Path(out)
    meta = read_config(bundle_folder / "classifier")
    classifier = load_classifier(bundle_folder / "classifier")
    written = [out / "classifier.onnx", out / TOKENIZER_FILE, out / CONFIG]
    if isinstance(classifier, OnnxClassifier):
        shutil.copy2(bundle_folder / "classifier" / str(meta.get("graph", GRAPH)), written[0])
        multiple = classifier.length_multiple
    else:
        multiple = export_classifier(classifier, written[0])
    shutil.copy2(bundle_folder / TOKENIZER_FILE, written[1])
    config = {
        "labels": list(classifier.config.labels),
        "pooling": classifier.config.pooling,
        "max_length": int(meta.get("max_length", classifier.config.trunk.block_size)),
        "classifier": {"graph": written[0].name, "length_multiple": multiple},
        "inputs": {"input_ids": "int64 (batch, length), right-padded", "lengths": "int64 (batch,) real lengths"},
        "outputs": {"logits": "float32 (batch, labels) for the classifier, (batch, length, vocab) for the LM"},
        "quantization": meta.get("quantization"),
    }
    if (bundle_folder / "lm" / CONFIG).is_file():
        lm_graph = out / "lm.onnx"
        config["lm"] = {"graph": lm_graph.name, "length_multiple": export_lm(load_lm(bundle_folder / "lm"), lm_graph)}
        written.insert(1, lm_graph)
    written[-1].write_text(json.dumps(config, indent=2))
    return written
