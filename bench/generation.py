"""Generation with and without the key/value cache: the same model, prompt and greedy decoding, both ways.

    lmforge bench generation                      # = python bench/generation.py
    python bench/generation.py --threads 2 --repeat 5
    python bench/generation.py --lm data/models/lm --new-tokens 256

Batch 1, a seeded prompt of `--prompt-tokens` token ids, `--new-tokens` new tokens by greedy decoding through
the one sampler (models/sampling.py `decode`): cached (`use_cache=True`, what every front serves) and uncached
(`use_cache=False`: the whole context read again for every token), alternated `--repeat` times. Each mode's
figure is its best run (the least disturbed: on a shared machine other processes only ever slow a run down, and
two torch threads lose far more to a busy core than one); the medians are in the JSON too. The two token
sequences must be identical (the program fails otherwise). Both follow the same rule at block_size (context
shift, models/sampling.py), so both read the same contexts, and both compute logits for the last position only:
the ratio is the cache's alone. For scale, `previous_tokens_per_s` times the greedy loop that served /generate
before the cache (the last block_size tokens through the whole forward, logits for every position, each step);
its tokens equal the others' until the context first reaches block_size (checked), then its sliding context
differs from the shift.

The model: the pipeline's LM (`--lm DIR`, default params.yaml's `paths.lm` when it exists), else a seeded
random-init model of the `small` preset (the pipeline's default shape). A second row repeats the measurement on
the same shape with block_size 512 (random init, 256 new tokens never reach the shift), where the uncached cost
of a long context shows; `--no-long` leaves it out.

Prints a table and, as its last line, a JSON object: prompt_tokens, new_tokens, cached_tokens_per_s,
uncached_tokens_per_s, ratio, previous_tokens_per_s, identical, model, median, runs, threads, torch, machine,
long_context {same keys}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.checkpoint import load_lm  # noqa: E402
from models.sampling import GREEDY, decode  # noqa: E402
from models.transformer import GPT, small  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LONG_BLOCK = 512


def default_lm() -> Path | None:
    """params.yaml's `paths.lm`, when the pipeline has written it."""
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError

    try:
        lm = Path(load_params(ROOT / "params.yaml").paths.lm)
    except UserError:
        return None
    lm = lm if lm.is_absolute() else ROOT / lm
    return lm if (lm / "config.json").is_file() else None


def random_model(block_size: int) -> GPT:
    """The `small` preset (4096-token vocabulary) with seeded random weights."""
    torch.manual_seed(0)
    return GPT(small(block_size=block_size)).eval()


def decode_timed(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[list[int], float]:
    """The greedy continuation's token ids and the seconds it took."""
    start = time.perf_counter()
    tokens = [int(t) for t in decode(model, prompt, new_tokens, GREEDY, use_cache=use_cache)]
    return tokens, time.perf_counter() - start


@torch.inference_mode()
def previous_timed(model: GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding as /generate did before the cache, and the seconds it took: every step the last block_size
    tokens through the whole forward, logits for every position."""
    block, vocab = model.config.block_size, model.config.vocab_size
    start, idx = time.perf_counter(), prompt
    for _ in range(new_tokens):
        logits = model(idx[:, -block:])[0][0, -1, :vocab]
        idx = torch.cat([idx, logits.argmax().view(1, 1)], dim=1)
    return idx[0, prompt.size(1) :].tolist(), time.perf_counter() - start


def measure(model: GPT, prompt_tokens: int, new_tokens: int, repeat: int) -> dict:
    """Cached, uncached and previous greedy decoding of the same prompt, alternated `repeat` times; the best and the
    median run of each in tokens/s."""
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ways = {
        "cached": lambda n: decode_timed(model, prompt, n, use_cache=True),
        "uncached": lambda n: decode_timed(model, prompt, n, use_cache=False),
        "previous": lambda n: previous_timed(model, prompt, n),
    }
    for way in ways.values():  # warm-up: first calls allocate and pick kernels
        way(8)
    runs: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, list[int]] = {}
    for _ in range(repeat):
        for name, way in ways.items():
            outputs[name], seconds = way(new_tokens)
            runs[name].append(new_tokens / seconds)
    check_outputs(outputs, max(0, cfg.block_size - prompt_tokens + 1))
    cached, uncached, previous = (max(runs[name]) for name in ways)
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "cached_tokens_per_s": round(cached, 1),
        "uncached_tokens_per_s": round(uncached, 1),
        "ratio": round(cached / uncached, 2),
        "previous_tokens_per_s": round(previous, 1),
        "identical": True,
        "model": {
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "block_size": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "pos_encoding": cfg.pos_encoding,
            "attn_window": cfg.attn_window,
            "params": model.num_params(),
        },
        "median": {f"{name}_tokens_per_s": round(statistics.median(rates), 1) for name, rates in runs.items()},
        "runs": {f"{name}_tokens_per_s": [round(r, 1) for r in rates] for name, rates in runs.items()},
    }


def check_outputs(outputs: dict[str, list[int]], same_as_previous: int) -> None:
    """Exit with a message unless cached and uncached decoding picked the same tokens, and the previous sampler
    the same first `same_as_previous` tokens (before its context first slides)."""
    for other, n in (("uncached", None), ("previous", same_as_previous)):
        a, b = outputs["cached"][:n], outputs[other][:n]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise SystemExit(f"generation: cached and {other} decoding differ at new token {first}")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row(name: str, r: dict) -> str:
    return (
        f"{name:<34} {r['model']['block_size']:>5} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
        f"{r['cached_tokens_per_s']:>12,.1f} {r['uncached_tokens_per_s']:>14,.1f} {r['ratio']:>6.2f}x "
        f"{r['previous_tokens_per_s']:>14,.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", type=Path, default=None, help="an LM folder (default: params.yaml's paths.lm if present)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (seeded ids)")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens to generate (the /generate maximum: 256)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per mode, alternated; the best is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-long", action="store_true", help=f"skip the block_size {LONG_BLOCK} row")
    args = ap.parse_args(argv)
    if min(args.prompt_tokens, args.new_tokens, args.repeat) < 1:
        ap.error("--prompt-tokens, --new-tokens and --repeat must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = args.lm or default_lm()
    model, source = (load_lm(lm), str(lm)) if lm is not None else (random_model(128), "small preset, random init")
    print(f"model: {source}; {args.repeat} runs per mode, {torch.get_num_threads()} threads ...", file=sys.stderr)
    r = measure(model, args.prompt_tokens, args.new_tokens, args.repeat)
    r["model"]["source"] = source
    if not args.no_long:
        long = measure(random_model(LONG_BLOCK), args.prompt_tokens, args.new_tokens, args.repeat)
        long["model"]["source"] = f"small preset, block_size {LONG_BLOCK}, random init"
        r["long_context"] = long
    r.update(threads=torch.get_num_threads(), torch=torch.__version__, machine=f"{cpu_name()}, {platform.machine()}")
    header = ("model", "block", "prompt", "new", "cached tok/s", "uncached tok/s", "ratio", "previous tok/s")
    print("{:<34} {:>5} {:>6} {:>4} {:>12} {:>14} {:>7} {:>14}".format(*header))
    print(row(source[:34], r))
    if "long_context" in r:
        print(row(r["long_context"]["model"]["source"][:34], r["long_context"]))
    print(f"greedy, batch 1, outputs identical; {r['threads']} threads, torch {r['torch']}, {r['machine']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
