"""The ONNX Runtime classifier: a classifier folder of kind `onnx` run by an `onnxruntime.InferenceSession`.

Layout of the folder (written by `models.onnx_export.write_onnx_classifier`):

    model.onnx     the graph: inputs `input_ids` (int64 B x T), `lengths` (int64 B), output `logits` (float B x K)
    short.onnx     (a windowed trunk only) the same classifier for T <= the window: plain attention, any T
    config.json    kind `onnx`, the classifier `config` (trunk, labels, pooling) it was exported from, `graph`,
                   `short_graph` (null when none), `length_multiple`, `quantization` (null for fp32, else how the
                   graphs were quantized), max_length

`load_classifier` (models/checkpoint.py) returns an `OnnxClassifier`: an `nn.Module` without parameters whose
`forward(ids, lengths)` returns a logits tensor, so Bundle, evaluate, the BentoML service, the gRPC server and the
MLflow pyfunc run it like a PyTorch classifier. The session is created once, on the CPU execution provider, with
as many intra-op threads as torch uses (`torch.get_num_threads()` at load time). Nothing is unpickled: the graph is
protobuf, the config JSON.

A trunk with a window exports the blocked attention kernel, which needs T to be a multiple of the window
(`length_multiple`): `forward` right-pads the ids to the next multiple, which changes no logit
(causal tokens never see later positions, bidirectional ones mask keys past `lengths`, pooling reads `lengths`).
A batch of at most one window (most texts of the default data are) runs the short graph instead, unpadded: at
batch 1 the padding to a full window cost more than the whole short forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.classifier import ClassifierConfig
from models.errors import ArtifactError

ONNX_KIND = "onnx"
GRAPH = "model.onnx"
SHORT_GRAPH = "short.onnx"
INPUTS = ("input_ids", "lengths")
OUTPUT = "logits"


def cpu_session(graph: Path, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession of `graph` on the CPU execution provider with `threads` intra-op threads (default: as
    many as torch uses), every graph optimization on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    graph = Path(graph)
    if not graph.is_file():
        raise ArtifactError(graph, "missing")
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's load errors (InvalidGraph, InvalidProtobuf, ...) derive from Exception alone
        raise ArtifactError(graph, f"not a loadable ONNX graph ({' '.join(str(e).split())[:200]})") from None


class OnnxClassifier(nn.Module):
    """A classifier run by ONNX Runtime, called like `TransformerClassifier` (module docstring)."""

    def __init__(
        self,
        config: ClassifierConfig,
        session: ort.InferenceSession,
        length_multiple: int = 1,
        short: ort.InferenceSession | None = None,
    ):
        super().__init__()
        self.config = config
        self.session = session
        self.length_multiple = length_multiple
        self.short = short
        """The session of the graph for T <= length_multiple (None: `session` serves every T)."""

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) for right-padded token ids `idx` (B, T) with real `lengths` (B,)."""
        T = idx.size(1)
        session = self.short if self.short is not None and T <= self.length_multiple else self.session
        extra = -T % self.length_multiple if session is self.session else 0
        if extra:
            idx = F.pad(idx, (0, extra))  # id 0: any id does, positions past `lengths` change no logit
        feed = {
            INPUTS[0]: np.ascontiguousarray(idx.numpy(), dtype=np.int64),
            INPUTS[1]: np.ascontiguousarray(lengths.numpy(), dtype=np.int64),
        }
        (logits,) = session.run([OUTPUT], feed)
        return torch.from_numpy(logits)


def load_onnx_classifier(path: Path, meta: dict, config: ClassifierConfig) -> OnnxClassifier:
    """The `OnnxClassifier` of folder `path` whose config.json is `meta` (its `config` already parsed)."""
    file = Path(path) / "config.json"
    graph = str(meta.get("graph", GRAPH))
    try:
        multiple = int(meta.get("length_multiple", 1))
    except (TypeError, ValueError):
        raise ArtifactError(file, f"length_multiple {meta.get('length_multiple')!r} is not an integer") from None
    if multiple < 1 or Path(graph).name != graph:
        raise ArtifactError(file, f"bad graph {graph!r} or length_multiple {multiple}")
    short = meta.get("short_graph")
    if short is not None and (not isinstance(short, str) or Path(short).name != short):
        raise ArtifactError(file, f"bad short_graph {short!r}")
    sessions = [_checked_session(Path(path) / name) for name in (graph, short) if name]
    return OnnxClassifier(config, sessions[0], multiple, sessions[1] if short else None).eval()


def _checked_session(graph: Path) -> ort.InferenceSession:
    """`cpu_session` of a classifier graph whose inputs are `INPUTS`."""
    session = cpu_session(graph)
    names = tuple(i.name for i in session.get_inputs())
    if names != INPUTS:
        raise ArtifactError(graph, f"inputs are {list(names)}, expected {list(INPUTS)}")
    return session


def graph_weights(graph: Path) -> int:
    """Weights stored in ONNX graph `graph` (int8 counted like float; quantization scales and zero points not)."""
    import onnx  # 1.5 s to import: only evaluate's parameter count needs it

    inits = onnx.load(str(graph), load_external_data=False).graph.initializer
    return sum(int(np.prod(t.dims)) for t in inits if not t.name.endswith(("_scale", "_zero_point")) and t.dims)
