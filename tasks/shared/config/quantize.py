"""`quantize:` — int8 weights for the float variants (fp32, pruned, sparse, distilled)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class QuantizeConfig(Section):
    """int8 dynamic quantization: int8 Linear weights, activations quantized per batch at run time."""

    sources: list[Literal["fp32", "pruned", "sparse", "distilled"]] = Field(
        default_factory=lambda: ["fp32", "pruned", "distilled"]
    )
    """Float variants to quantize: fp32 gives `int8`, the others `<source>-int8`; empty = no int8 variant."""
    backend: Literal["auto", "torchao", "torch.ao"] = "auto"
    """`torchao` (quantize_ with Int8DynamicActivationInt8WeightConfig, the maintained path), `torch.ao`
    (quantize_dynamic, deprecated), or `auto`: time both on a batch here and keep the faster (recorded in metrics)."""
    per_channel: bool = True
    """One scale per output channel (more accurate) instead of one per tensor."""
