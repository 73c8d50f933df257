"""Every compressed variant against the fp32 fine-tuned model: quality, latency, size, against the issue's targets.

    make pipeline                      # builds the variants (or: dvc repro quantize)
    python bench/compression.py        # or: lmforge bench compression
    python bench/compression.py --reps 400 --threads 2     # ONNX Runtime sessions get the same thread count

Scores each variant the pipeline built (tasks/shared/variants.py; the ONNX Runtime ones included) on the held-out
test split with the evaluate stage's own code (tokenizer + service bundle, tokenization included in every latency), with
more timed requests than the stage uses, all in one process on this machine. Prints a table, the
batch-1 breakdown (tokenization vs forward), the targets with their verdicts, and, as the last line, a
JSON object: per variant `macro_f1`, `p50_ms_b1`, `p99_ms_b1`, `p50_ms_b32`, `size_mb`, `params`, ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {
    # variant: (what, check(variant metrics, fp32 metrics) -> (value, passed))
    "int8": [
        (
            "throughput at batch 32 >= 2.5x fp32",
            lambda v, f: (f["p50_ms_b32"] / v["p50_ms_b32"], f["p50_ms_b32"] / v["p50_ms_b32"] >= 2.5),
        ),
        (
            "Linear weights >= 3.5x smaller",
            lambda v, f: (v.get("linear_weight_ratio", 0), v.get("linear_weight_ratio", 0) >= 3.5),
        ),
        (
            "macro-F1 drop <= 1 point",
            lambda v, f: (100 * (f["macro_f1"] - v["macro_f1"]), f["macro_f1"] - v["macro_f1"] <= 0.01),
        ),
    ],
    "onnx-int8": [  # ONNX Runtime's int8 graph (tasks/onnx.py) held to the same bar as PyTorch's int8
        (
            "throughput at batch 32 >= 2.5x fp32",
            lambda v, f: (f["p50_ms_b32"] / v["p50_ms_b32"], f["p50_ms_b32"] / v["p50_ms_b32"] >= 2.5),
        ),
        (
            "macro-F1 drop <= 1 point",
            lambda v, f: (100 * (f["macro_f1"] - v["macro_f1"]), f["macro_f1"] - v["macro_f1"] <= 0.01),
        ),
        ("speedup at batch 1 (reported)", lambda v, f: (f["p50_ms_b1"] / v["p50_ms_b1"], None)),
    ],
    "onnx": [
        ("speedup at batch 1 (reported)", lambda v, f: (f["p50_ms_b1"] / v["p50_ms_b1"], None)),
        ("speedup at batch 32 (reported)", lambda v, f: (f["p50_ms_b32"] / v["p50_ms_b32"], None)),
    ],
    "distilled": [
        (
            "batch-1 latency >= 2x faster",
            lambda v, f: (f["p50_ms_b1"] / v["p50_ms_b1"], f["p50_ms_b1"] / v["p50_ms_b1"] >= 2),
        ),
        (
            "macro-F1 drop <= 2 points",
            lambda v, f: (100 * (f["macro_f1"] - v["macro_f1"]), f["macro_f1"] - v["macro_f1"] <= 0.02),
        ),
    ],
    "pruned": [
        (
            ">= 30% fewer parameters",
            lambda v, f: (100 * (1 - v["params"] / f["params"]), v["params"] <= 0.7 * f["params"]),
        ),
        (
            "macro-F1 drop <= 1 point",
            lambda v, f: (100 * (f["macro_f1"] - v["macro_f1"]), f["macro_f1"] - v["macro_f1"] <= 0.01),
        ),
        ("speedup at batch 1 (reported)", lambda v, f: (f["p50_ms_b1"] / v["p50_ms_b1"], None)),
        ("speedup at batch 32 (reported)", lambda v, f: (f["p50_ms_b32"] / v["p50_ms_b32"], None)),
    ],
}
KEYS = (
    "macro_f1",
    "accuracy",
    "p50_ms_b1",
    "p99_ms_b1",
    "tokenize_ms_b1",
    "forward_ms_b1",
    "p50_ms_b32",
    "p99_ms_b32",
    "throughput_per_s",
    "size_mb",
    "params",
    "peak_rss_mb",
)


def target_names(results: dict) -> list[tuple[str, str]]:
    """Each built variant with a target, and the TARGETS entry it is held to (`<source>-onnx[-int8]` to onnx's)."""
    out = []
    for name in results:
        for target in TARGETS:
            if name == target or (target.startswith("onnx") and name.endswith(f"-{target}")):
                out.append((name, target))
    return out


def best_int8(results: dict) -> str | None:
    """The int8 variant (PyTorch or ONNX Runtime) fastest at batch 32 among those within 1 point of fp32."""
    within = [n for n, m in results.items() if n.endswith("int8") and m["f1_drop_points"] <= 1.0]
    return max(within, key=lambda n: results[n]["speedup_b32"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--reps", type=int, default=300, help="batch-1 requests timed per variant")
    parser.add_argument("--batches", type=int, default=40, help="batch-32 requests timed per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.bundle import load_parts
    from models.quantize import linear_weight_bytes
    from models.tokenizer import TOKENIZER_FILE
    from tasks.shared.config.params import load_params
    from tasks.shared.io import read_parquet
    from tasks.shared.scoring import bundle_scorer, score_model, timed
    from tasks.shared.variants import built

    params = load_params(args.params)
    paths = params.paths
    variants = built(paths)
    if "fp32" not in variants:
        sys.exit(f"bench/compression.py: {paths.classifier}: no fine-tuned model; run `make pipeline` first")
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    test = data[data["split"] == "test"]
    cfg = params.evaluate.model_copy(update={"latency_samples": args.reps, "latency_batches": args.batches})
    tokenizer = Path(paths.tokenizer) / TOKENIZER_FILE
    results, scorers = {}, {}
    for name, folder in variants.items():
        results[name], _, scorers[name] = score_model(
            lambda f=folder: bundle_scorer(load_parts(tokenizer, f), f), test, cfg
        )
        results[name]["linear_weight_bytes"] = linear_weight_bytes(load_parts(tokenizer, folder).classifier)
    for name, t in timed(scorers, test["text"].tolist(), cfg).items():  # all variants take turns: fair ratios
        results[name].update(t)
    results = {n: {k: m[k] for k in (*KEYS, "linear_weight_bytes")} for n, m in results.items()}
    fp32 = results["fp32"]
    for m in results.values():
        # an ONNX Runtime variant has no torch Linears to count: its size is in size_mb
        bytes_ = m["linear_weight_bytes"]
        m["linear_weight_ratio"] = round(fp32["linear_weight_bytes"] / bytes_, 3) if bytes_ else None
        m["speedup_b1"] = round(fp32["p50_ms_b1"] / m["p50_ms_b1"], 3)
        m["speedup_b32"] = round(fp32["p50_ms_b32"] / m["p50_ms_b32"], 3)
        m["f1_drop_points"] = round(100 * (fp32["macro_f1"] - m["macro_f1"]), 2)

    cols = [
        "macro_f1",
        "f1_drop_points",
        "p50_ms_b1",
        "p99_ms_b1",
        "tokenize_ms_b1",
        "forward_ms_b1",
        "p50_ms_b32",
        "speedup_b1",
        "speedup_b32",
        "size_mb",
        "params",
        "linear_weight_ratio",
    ]
    print(
        f"{len(test)} test texts; {torch.get_num_threads()} torch threads; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'variant':<15}" + "".join(f"{c:>20}" for c in cols))
    for name, m in results.items():
        print(f"{name:<15}" + "".join(f"{'-' if m[c] is None else m[c]:>20}" for c in cols))
    print(
        "\nbatch-1 request, where the time goes (medians, ms): tokenization | forward | "
        "p50 of the whole minus both (softmax, Python; medians do not add exactly)"
    )
    for name, m in results.items():
        rest = m["p50_ms_b1"] - m["tokenize_ms_b1"] - m["forward_ms_b1"]
        print(f"  {name:<15} {m['tokenize_ms_b1']:>7.3f} | {m['forward_ms_b1']:>7.3f} | {rest:>7.3f}")
    verdicts = {}
    print("\ntargets (against fp32):")
    for name, target in target_names(results):
        for what, check in TARGETS[target]:
            value, ok = check(results[name], fp32)
            verdict = "reported" if ok is None else "met" if ok else "MISSED"
            verdicts[f"{name}: {what}"] = {"value": round(value, 3), "verdict": verdict}
            print(f"  {name:<20} {what:<34} {value:>8.3f}  {verdict}")
    best = best_int8(results)
    if best:
        value = results[best]["speedup_b32"]
        verdict = "met" if value >= 2.5 else "MISSED"
        verdicts["best int8: throughput at batch 32 >= 2.5x fp32 with drop <= 1 point"] = {
            "variant": best,
            "value": value,
            "verdict": verdict,
        }
        print(f"  best int8 within 1 point ({best}): {value:.3f}x fp32 at batch 32  {verdict}")
    print(
        json.dumps(
            {
                "machine": (
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{torch.get_num_threads()} threads, torch {torch.__version__}"
                ),
                "test_texts": len(test),
                "variants": results,
                "targets": verdicts,
            }
        )
    )


if __name__ == "__main__":
    main()
