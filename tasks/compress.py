"""compress: int8 dynamic quantization of the fine-tuned classifier, saved as plain tensors."""

from __future__ import annotations

from dataclasses import dataclass

from models.checkpoint import dir_size_mb, load_classifier, quantize_classifier, read_config, write_quantized
from models.classifier import ClassifierConfig
from tasks.shared.config.base import Paths
from tasks.shared.config.compress import CompressConfig
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import Tracker

SECTIONS = {"compress": CompressConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""


@dataclass
class CompressResult:
    method: str
    fp32_size_mb: float
    int8_size_mb: float

    @property
    def metrics(self) -> dict:
        return {**self.__dict__, "size_ratio": round(self.int8_size_mb / self.fp32_size_mb, 4)}


def run(cfg: CompressConfig, paths: Paths, tracker: Tracker | None = None) -> CompressResult:
    meta = read_config(paths.classifier)
    model = load_classifier(paths.classifier)
    qmodel = quantize_classifier(model, per_channel=cfg.per_channel)
    extra = {k: v for k, v in meta.items() if k not in ("kind", "config")}
    with atomic_dir(paths.compressed) as d:
        write_quantized(qmodel, ClassifierConfig(**meta["config"]), d, cfg.per_channel, extra=extra)
    return CompressResult(
        method="dynamic-int8-per-channel" if cfg.per_channel else "dynamic-int8-per-tensor",
        fp32_size_mb=round(dir_size_mb(paths.classifier), 3),
        int8_size_mb=round(dir_size_mb(paths.compressed), 3),
    )


def main() -> None:
    stage_main("compress", lambda p, t: run(p.compress, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
