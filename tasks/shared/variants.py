"""The model variants: where each one lives, which exist, and the marker a switched-off variant leaves.

A variant is a classifier folder that the service code loads (`models.bundle.load_parts`): `fp32` (the
fine-tuned model), `pruned`, `sparse`, `distilled`, the int8 copy of any of them (`int8` for fp32,
`<source>-int8` for the others), and their ONNX graphs run by ONNX Runtime (`onnx` and `onnx-int8` for fp32,
`<source>-onnx` and `<source>-onnx-int8` for the others). Each compression stage writes one folder; a stage
switched off in params.yaml writes `skipped.json` there instead, so DVC still has its output and evaluate knows
why the variant is missing. Evaluate, promotion and the benchmark all find variants here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.shared.config.base import Paths

FLOAT_VARIANTS = ("fp32", "pruned", "sparse", "distilled")
SHORT_BASELINE = "short"
"""The finetune `baselines` entry of the 128-token model: the pretrained classifier by finetune's recipe, reading at
most models.tokenizer.LONG_TOKENS tokens; evaluate compares every variant with it on long and short test rows."""
SKIPPED = "skipped.json"
MODEL_CONFIG = "config.json"


def int8_name(source: str) -> str:
    """The int8 variant made from float variant `source`."""
    return "int8" if source == "fp32" else f"{source}-int8"


def onnx_name(source: str, int8: bool = False) -> str:
    """The ONNX Runtime variant made from float variant `source` (its int8 graph when `int8`)."""
    name = "onnx" if source == "fp32" else f"{source}-onnx"
    return f"{name}-int8" if int8 else name


def folders(paths: Paths) -> dict[str, Path]:
    """Every variant name and its folder, float variants first, then int8, then ONNX (whether or not it was built)."""
    base = {"fp32": paths.classifier, "pruned": paths.pruned, "sparse": paths.sparse, "distilled": paths.distilled}
    return {
        **{k: Path(v) for k, v in base.items()},
        **{int8_name(s): Path(paths.quantized) / int8_name(s) for s in FLOAT_VARIANTS},
        **{onnx_name(s, q): Path(paths.onnx) / onnx_name(s, q) for s in FLOAT_VARIANTS for q in (False, True)},
    }


def built(paths: Paths) -> dict[str, Path]:
    """The variants whose folder holds a model, in `folders` order."""
    return {name: f for name, f in folders(paths).items() if (f / MODEL_CONFIG).is_file()}


def skipped(paths: Paths) -> dict[str, str]:
    """Variants switched off, with the reason their stage recorded."""
    out = {}
    for name, f in folders(paths).items():
        if (f / SKIPPED).is_file():
            try:
                out[name] = str(json.loads((f / SKIPPED).read_text()).get("reason", "switched off"))
            except (OSError, ValueError):
                out[name] = "switched off"
    return out


def write_skipped(folder: Path, reason: str) -> None:
    """Replace a variant's `folder` (atomically) with the marker of a switched-off variant."""
    from tasks.shared.io import atomic_dir

    with atomic_dir(folder) as d:
        (d / SKIPPED).write_text(json.dumps({"reason": reason}, indent=2) + "\n")
