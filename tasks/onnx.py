"""onnx: the ONNX Runtime variants of each listed float variant (`onnx`, `onnx-int8`, `distilled-onnx`, ...).

Each source classifier is exported with `torch.onnx.export` (models/onnx_export.py: dynamic batch and length,
attention exact for every length; a windowed trunk also as a graph for inputs of at most one window, run unpadded)
into a folder of kind `onnx` that `models.checkpoint.load_classifier` runs with ONNX Runtime, and, with `int8`,
quantized by ONNX Runtime's `quantize_dynamic` (measured faster than `quantize_static` here:
models/onnx_export.py). Each graph is run on a few validation texts against its PyTorch source: the largest logit
difference and the argmax agreement are in the metrics, and an fp32 graph that differs by more than 1e-3 fails the
stage (an export bug, never a variant to serve). Evaluate then scores the variants like every other, and promotion
can pick one (`promote.variant: auto`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models.checkpoint import CONFIG, dir_size_mb, load_classifier, read_config
from models.classifier import TransformerClassifier
from models.onnx_export import write_onnx_classifier, write_onnx_int8
from models.quantize import int8_linears
from models.tokenizer import PAD, encode_texts, load_tokenizer
from tasks.shared.config.base import Paths
from tasks.shared.config.onnx import OnnxConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.tracking import Tracker
from tasks.shared.variants import folders, onnx_name

SECTIONS = {"onnx": OnnxConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
MAX_FP32_DIFF = 1e-3
"""Largest logit difference allowed between an fp32 graph and its PyTorch source on the check texts."""


@dataclass
class OnnxResult:
    variants: dict[str, dict] = field(default_factory=dict)
    """Per variant: source, size (MB), seconds to write, max logit difference and argmax agreement vs the source."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


def check_batch(paths: Paths, rows: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and lengths of the first `rows` validation texts (every text when there is no validation split)."""
    tok = load_tokenizer(paths.tokenizer)
    data = read_parquet(paths.clean_labeled, ["text", "split"])
    texts = data.loc[data["split"] == "val", "text"].head(rows).tolist() or data["text"].head(rows).tolist()
    return encode_texts(tok, texts, max_length, tok.token_to_id(PAD))


def compare(folder: Path, source: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """How the ONNX classifier in `folder` agrees with its PyTorch `source` on `batch`."""
    with torch.inference_mode():
        want, got = source(*batch), load_classifier(folder)(*batch)
    return {
        "max_logit_diff": round(float((want - got).abs().max()), 6),
        "agreement": round(float((want.argmax(1) == got.argmax(1)).float().mean()), 4),
    }


def source_models(cfg: OnnxConfig, paths: Paths) -> dict[str, tuple[dict, TransformerClassifier]]:
    """Each listed source's config.json and float Transformer classifier."""
    where, models = folders(paths), {}
    for source in dict.fromkeys(cfg.sources):
        folder = where[source]
        if not (folder / CONFIG).is_file():
            raise UserError(f"params.yaml: onnx.sources: {source} has no model at {folder} (is its stage off?)")
        model = load_classifier(folder)
        if type(model) is not TransformerClassifier or int8_linears(model):
            raise UserError(f"params.yaml: onnx.sources: {source} at {folder} is not a float Transformer classifier")
        models[source] = (read_config(folder), model)
    return models


def run(cfg: OnnxConfig, paths: Paths, tracker: Tracker | None = None) -> OnnxResult:
    result = OnnxResult()
    models = source_models(cfg, paths)
    with atomic_dir(paths.onnx) as d:
        for source, (meta, model) in models.items():
            batch = check_batch(paths, cfg.check_rows, int(meta.get("max_length", model.config.trunk.block_size)))
            extra = {k: v for k, v in meta.items() if k not in ("kind", "config")}
            names = [onnx_name(source)] + ([onnx_name(source, int8=True)] if cfg.int8 else [])
            for name in names:
                start = time.perf_counter()
                (d / name).mkdir()
                if name == names[0]:
                    write_onnx_classifier(model, d / name, {**extra, "variant": name, "source": source})
                else:
                    write_onnx_int8(d / names[0], d / name, cfg.per_channel, {"variant": name})
                seconds = time.perf_counter() - start
                report = {"source": source, "size_mb": round(dir_size_mb(d / name), 3), "seconds": round(seconds, 1)}
                result.variants[name] = {**report, **compare(d / name, model, batch)}
                print(f"onnx: {source} -> {name}: {result.variants[name]}")
            if result.variants[names[0]]["max_logit_diff"] > MAX_FP32_DIFF:
                raise RuntimeError(f"onnx: {names[0]} differs from {source} by {result.variants[names[0]]}")
    return result


def main() -> None:
    stage_main("onnx", lambda p, t: run(p.onnx, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
