"""`onnx:` — ONNX Runtime variants: float variants exported to ONNX, fp32 and int8 (models/onnx_export.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class OnnxConfig(Section):
    """Export float variants to ONNX graphs that ONNX Runtime serves (`onnx` kind, models/onnx_runtime.py)."""

    sources: list[Literal["fp32", "pruned", "sparse", "distilled"]] = Field(default_factory=lambda: ["distilled"])
    """Float Transformer variants to export: fp32 gives `onnx` (and `onnx-int8`), the others `<source>-onnx` (and
    `<source>-onnx-int8`); empty = no ONNX variant. The default exports the 1-block student only: on the 2-core CPU
    ORT did not beat PyTorch on the 4-block fp32 classifier, and its two variants cost the pipeline about 85 s."""
    int8: bool = True
    """Also write the int8 graph: ONNX Runtime's dynamic quantization (int8 MatMul/Gemm weights and embedding
    tables, activations quantized per batch at run time)."""
    per_channel: bool = True
    """int8: one weight scale per output channel (more accurate) instead of one per tensor."""
    check_rows: int = Field(8, ge=1)
    """Validation texts on which each graph is run against its PyTorch source (max logit difference, agreement)."""
