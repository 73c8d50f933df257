"""quantize: int8 dynamic quantization of each listed float variant (`int8`, `pruned-int8`, ...).

Every nn.Linear gets int8 weights (one scale per output channel) and quantizes its activations per
batch at run time. Two backends write the same plain-tensor format (models/checkpoint.py): torchao's
`quantize_` (the maintained path) and torch.ao's `quantize_dynamic` (deprecated, fbgemm kernels).
`backend: auto` times both on a batch of real validation examples on this CPU and keeps the faster;
the timings are in the metrics, so the choice is on record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.checkpoint import CONFIG, dir_size_mb, load_classifier, read_config, write_quantized
from models.quantize import linear_weight_bytes, pick_backend, quantize_classifier
from models.tokenizer import PAD, encode_texts, load_tokenizer
from tasks.shared.config.base import Paths
from tasks.shared.config.quantize import QuantizeConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.tracking import Tracker
from tasks.shared.variants import folders, int8_name

SECTIONS = {"quantize": QuantizeConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
SAMPLE = 32
"""Validation texts in the batch `auto` times each backend on."""


@dataclass
class QuantizeResult:
    backend: str
    """The backend that wrote every int8 variant."""
    backend_ms: dict[str, float | str] = field(default_factory=dict)
    """auto: median forward ms of each backend on one validation batch (or why it could not run)."""
    variants: dict[str, dict] = field(default_factory=dict)
    """Per int8 variant: source, float and int8 size (MB), Linear-weight bytes and their ratio."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


def sample_batch(paths: Paths, max_length: int):
    """Token ids and lengths of the first SAMPLE validation texts (what `auto` times)."""
    tok = load_tokenizer(paths.tokenizer)
    data = read_parquet(paths.clean_labeled, ["text", "split"])
    texts = data.loc[data["split"] == "val", "text"].head(SAMPLE).tolist() or data["text"].head(SAMPLE).tolist()
    return encode_texts(tok, texts, max_length, tok.token_to_id(PAD))


def run(cfg: QuantizeConfig, paths: Paths, tracker: Tracker | None = None) -> QuantizeResult:
    where = folders(paths)
    sources = {}
    for source in dict.fromkeys(cfg.sources):
        folder = where[source]
        if not (folder / CONFIG).is_file():
            raise UserError(
                f"params.yaml: quantize.sources: {source} has no model at {folder} (is its stage switched off?)"
            )
        sources[source] = folder
    backend, timings = cfg.backend, {}
    models = {source: (read_config(folder), load_classifier(folder)) for source, folder in sources.items()}
    if models and cfg.backend == "auto":
        meta, model = next(iter(models.values()))
        ids, lengths = sample_batch(paths, int(meta.get("max_length", 128)))
        choice = pick_backend(model, ids, lengths, cfg.per_channel)
        backend, timings = choice.backend, {**{k: round(v, 3) for k, v in choice.ms.items()}, **choice.errors}
        print(f"quantize: backend auto -> {backend} (median forward ms on {len(ids)} validation texts: {timings})")
    result = QuantizeResult(backend=backend, backend_ms=timings)
    with atomic_dir(paths.quantized) as d:
        for source, (meta, model) in models.items():
            folder = sources[source]
            qmodel = quantize_classifier(model, backend=backend, per_channel=cfg.per_channel)
            name = int8_name(source)
            (d / name).mkdir()
            extra = {k: v for k, v in meta.items() if k not in ("kind", "config")}
            write_quantized(
                qmodel,
                model.config,
                d / name,
                backend,
                cfg.per_channel,
                extra={**extra, "variant": name, "source": source},
            )
            fp32_bytes, int8_bytes = linear_weight_bytes(model), linear_weight_bytes(qmodel)
            result.variants[name] = {
                "source": source,
                "float_size_mb": round(dir_size_mb(folder), 3),
                "int8_size_mb": round(dir_size_mb(Path(d) / name), 3),
                "linear_weight_ratio": round(fp32_bytes / int8_bytes, 3),
            }
            print(f"quantize: {source} -> {name}: {result.variants[name]}")
    return result


def main() -> None:
    stage_main("quantize", lambda p, t: run(p.quantize, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
