"""evaluate: every model variant and every baseline on the same held-out test split.

Variants (the candidates for promotion) are the classifier folders the compression stages wrote
(tasks/shared/variants.py): fp32, pruned, sparse, distilled and their int8 copies. Baselines (never
promoted): majority class, TF-IDF + logistic regression, and what finetune trained beside the model
(scratch Transformer, CNN, GRU).

Per model: accuracy and macro-F1 with 95% intervals (a paired, seeded bootstrap over the test rows:
tasks/shared/stats.py), per-class F1, expected calibration error (15 bins), CPU latency p50/p99
at batch 1 and batch 32 with tokenization and forward timed separately, throughput, weights stored,
size on disk and the peak resident memory added while loading and scoring it. Per variant also: the
behavioral tests (tasks/shared/behavior.py), a confusion matrix, and a paired comparison with every
trained baseline (`vs_baselines`: differences with intervals, paired-bootstrap and exact McNemar p-values),
which promotion's `beats_baselines` gate decides on. The language model's perplexity on
the test texts is reported beside them. Every scored artifact is recorded by path and sha256.

Long documents: a test row is long when its text has more than `LONG_TOKENS` (128) tokens under the project's
tokenizer, untruncated, and short otherwise (`test_examples_long`/`test_examples_short`). Every model gets
`macro_f1_long` and `macro_f1_short` (macro-F1 over the labels that occur in those rows) with 95% intervals from
the same bootstrap run on those rows alone (`LengthPart`), and when finetune trained the `short` baseline (the
128-token model), every variant gets `vs_short`: its paired comparison with that baseline on the long rows and
on the short rows (`stats.paired`, as in `vs_baselines`), which says what reading whole functions buys.

Outputs: metrics/evaluate.json (DVC metrics), a Markdown report and the charts (Pareto front of
macro-F1 against batch-1 latency, reliability diagram, confusion matrices) under `paths.evaluation`,
the same table as an MLflow table artifact, and plot data for `dvc plots`.

In MLflow, every model (variant or baseline) is a child run of evaluate's run, named after it, tagged `variant`
(its name), `kind` (transformer, int8, onnx, onnx-int8, baseline), `role` (variant, baseline) and `pareto`, with
its row of the comparison table as flat metrics (`accuracy`, `macro_f1`, an interval as `macro_f1_low` and
`macro_f1_high`, `p50_ms_b1`, `p50_ms_b32`, `size_mb`, `params`, ...; what was not measured for it is not logged)
and its test predictions as the table `predictions.json` (text cut to `PREDICTION_TEXT_CHARS`, label, prediction,
confidence). Select evaluate's child runs and *Compare*: a scatter of `macro_f1` against `p50_ms_b32` is the
Pareto front; the *Evaluation* tab (or the artifact) opens the predictions. Evaluate's own run keeps what is not
per model: the test-set sizes, the language model's perplexities and the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.bundle import load_parts
from models.checkpoint import CONFIG, load_lm, read_config
from models.tokenizer import EOT, LONG_TOKENS, TOKENIZER_FILE, load_tokenizer, token_counts
from tasks.shared.behavior import load_mft, run_behavioral
from tasks.shared.config.base import Paths
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.cost import stage_cost_report
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir, read_parquet, write_csv
from tasks.shared.plots import publish, pyplot
from tasks.shared.scoring import Scorer, bundle_scorer, score_model, scores, tfidf_scorer, timed
from tasks.shared.stats import Resamples, paired, score_intervals
from tasks.shared.tracking import NullTracker, Tracker, numeric
from tasks.shared.variants import SHORT_BASELINE, built, skipped

SECTIONS = {"evaluate": EvaluateConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
CONFUSION_PLOT = "evaluate_confusion.csv"
PER_CLASS_PLOT = "evaluate_per_class.csv"
TRADEOFF_PLOT = "evaluate_f1_vs_latency.csv"
"""Plot data in `paths.plots` (dvc.yaml `plots:`): test predictions of the best variant, its per-class
scores, and every model's macro-F1 against its batch-1 p50 latency."""
REPORT = "report.md"
PREDICTIONS_TABLE = "predictions.json"
"""Each model's test predictions, an MLflow table of its child run (text, label, prediction, confidence)."""
PREDICTION_TEXT_CHARS = 2000
"""Characters of each test text kept in `PREDICTIONS_TABLE` (the whole text is in `paths.predictions`)."""
TABLE_COLUMNS = (
    "accuracy",
    "accuracy_ci95",
    "macro_f1",
    "macro_f1_ci95",
    "macro_f1_long",
    "macro_f1_long_ci95",
    "macro_f1_short",
    "macro_f1_short_ci95",
    "ece",
    "p50_ms_b1",
    "p99_ms_b1",
    "p50_ms_b1_long",
    "tokenize_ms_b1",
    "forward_ms_b1",
    "p50_ms_b32",
    "p99_ms_b32",
    "tokenize_ms_b32",
    "forward_ms_b32",
    "throughput_per_s",
    "params",
    "size_mb",
    "peak_rss_mb",
    "behavioral_min_pass_rate",
)
"""Columns of the comparison table (Markdown report, MLflow table), in order."""


@dataclass
class EvaluateResult:
    test_examples: int
    test_examples_long: int
    """Test rows of more than `long_tokens` tokens (untruncated): where `macro_f1_long` is scored."""
    test_examples_short: int
    """The other test rows: where `macro_f1_short` is scored."""
    long_tokens: int
    variants: dict[str, dict]
    baselines: dict[str, dict]
    artifacts: dict[str, dict]
    """What was scored, by path and sha256 (tasks.shared.digest.tree_sha256): every model, the tokenizer
    and the labeled data. Promotion registers a variant only if its hashes still match."""
    language_model: dict
    skipped_variants: dict[str, str]

    @property
    def metrics(self) -> dict:
        return self.__dict__.copy()


class NGram:
    """Add-one unigram and interpolated bigram next-token models counted on a token stream, the yardsticks
    for the LM: p(t | prev) = lam * c(prev, t) / c(prev) + (1 - lam) * p_unigram(t)."""

    def __init__(self, tokens: np.ndarray, vocab: int, lam: float = 0.5) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        self.vocab, self.lam = vocab, lam
        self.unigram = (np.bincount(tokens, minlength=vocab) + 1.0) / (len(tokens) + vocab)
        self.context = np.bincount(tokens[:-1], minlength=vocab).astype(np.float64)
        self.pairs, self.counts = np.unique(tokens[:-1] * vocab + tokens[1:], return_counts=True)

    def bigram(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Maximum-likelihood p(nxt | prev) (0 for an unseen context or pair)."""
        codes = np.asarray(prev, dtype=np.int64) * self.vocab + nxt
        i = np.minimum(np.searchsorted(self.pairs, codes), len(self.pairs) - 1)
        counts = np.where(self.pairs[i] == codes, self.counts[i], 0)
        return np.divide(counts, self.context[prev], out=np.zeros(len(codes)), where=self.context[prev] > 0)

    def nll(self, prev: np.ndarray, nxt: np.ndarray, lam: float | None = None) -> tuple[float, float]:
        """Summed negative log-likelihood of `nxt` given `prev`: (unigram, bigram)."""
        lam = self.lam if lam is None else lam
        uni = self.unigram[nxt]
        return float(-np.log(uni).sum()), float(-np.log(lam * self.bigram(prev, nxt) + (1 - lam) * uni).sum())

    @classmethod
    def fit(cls, tokens: np.ndarray, vocab: int, held_out: float = 0.1) -> "NGram":
        """Counts on all of `tokens`, with lam picked on their last `held_out` share counted without it."""
        tokens = np.asarray(tokens, dtype=np.int64)
        cut = int(len(tokens) * (1 - held_out))
        part, tail = cls(tokens[:cut], vocab), tokens[cut:]
        lam = min(LAMBDAS, key=lambda lam: part.nll(tail[:-1], tail[1:], lam)[1])
        return cls(tokens, vocab, lam)


LAMBDAS = tuple(round(0.05 * k, 2) for k in range(1, 20)) + (0.99,)
"""Bigram interpolation weights tried on the held-out tail of the training tokens."""


def lm_perplexity(lm_dir: Path, tokenizer, texts: list[str], block: int, tokens: Path | None = None) -> dict:
    """Perplexity of the pretrained causal LM on `texts` (each from an end-of-text token, up to `block`
    tokens) and on the validation token shard (consecutive `block`-token windows), beside a unigram and a
    bigram model counted on the training shard (`NGram`) and scored on the same next tokens."""
    import torch
    import torch.nn.functional as F

    from tasks.shared.shards import load_tokens

    lm = load_lm(lm_dir)
    if not lm.config.causal:
        return {"test_perplexity": None, "note": "masked-LM trunk: no next-token perplexity"}
    eot = tokenizer.token_to_id(EOT)
    vocab = lm.config.vocab_size
    ngram = NGram.fit(load_tokens(tokens, "train"), vocab) if tokens is not None else None
    nll, uni, bi, count = 0.0, 0.0, 0.0, 0
    with torch.inference_mode():
        for enc in tokenizer.encode_batch(texts):
            ids = torch.tensor([[eot, *enc.ids[: block - 1]]])
            logits = lm(ids[:, :-1])[0][0, :, :vocab]
            nll += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
            count += ids.size(1) - 1
            if ngram is not None:
                u, b = ngram.nll(ids[0, :-1].numpy(), ids[0, 1:].numpy())
                uni, bi = uni + u, bi + b
    out = {"test_perplexity": round(float(np.exp(nll / max(count, 1))), 3), "test_tokens": count}
    if ngram is None:
        return out
    out |= {
        "unigram_test_perplexity": _ppl(uni, count),
        "bigram_test_perplexity": _ppl(bi, count),
        "bigram_lambda": ngram.lam,
    }
    val = np.asarray(load_tokens(tokens, "val"), dtype=np.int64)
    if len(val) <= block:
        return out
    windows = torch.from_numpy(val[: (len(val) - 1) // block * block + 1])
    x, y = windows[:-1].view(-1, block), windows[1:].view(-1, block)
    nll = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), 64):
            logits = lm(x[i : i + 64])[0][..., :vocab]
            nll += float(F.cross_entropy(logits.float().flatten(0, 1), y[i : i + 64].flatten(), reduction="sum"))
    u, b = ngram.nll(x.flatten().numpy(), y.flatten().numpy())
    n = y.numel()
    return out | {
        "val_perplexity": _ppl(nll, n),
        "unigram_val_perplexity": _ppl(u, n),
        "bigram_val_perplexity": _ppl(b, n),
        "val_tokens": n,
    }


def _ppl(nll: float, n: int) -> float:
    return round(float(np.exp(nll / max(n, 1))), 3)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated by another point of lower latency and higher score (x: latency, y: score), by latency."""
    front, best = [], -np.inf
    for name, (_, y) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if y > best:
            front.append(name)
            best = y
    return front


def plot_pareto(results: dict[str, dict], variants: set[str], path: Path):
    plt = pyplot()
    pts = {n: (m["p50_ms_b1"], m["macro_f1"]) for n, m in results.items() if "p50_ms_b1" in m}
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, (x, y) in pts.items():
        lo, hi = results[name].get("macro_f1_ci95") or (y, y)
        color = "tab:blue" if name in variants else "tab:gray"
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt="none", ecolor=color, alpha=0.5, capsize=3)
        ax.scatter(x, y, s=60, marker="o" if name in variants else "s", color=color)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.step([pts[n][0] for n in front], [pts[n][1] for n in front], where="post", color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency, batch 1 (ms, log scale; tokenization included)")
    ax.set_ylabel("test macro-F1")
    ax.set_title("Quality vs latency (circles: variants, squares: baselines; bars: 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig, front


def plot_reliability(results: dict[str, dict], path: Path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, m in results.items():
        rows = m.get("reliability") or []
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            "o-",
            ms=3,
            label=f"{name} (ECE {m['ece']:.3f})",
        )
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram, test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_confusion(y_true: list[str], y_pred: list[str], labels: list[str], title: str, path: Path):
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=labels, normalize="true", ax=ax, colorbar=False, values_format=".2f"
    )
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def per_class(y_true: list[str], y_pred: list[str], labels: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of every label."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        {
            "label": lab,
            "precision": round(float(a), 4),
            "recall": round(float(b), 4),
            "f1": round(float(c), 4),
            "support": int(d),
        }
        for lab, a, b, c, d in zip(labels, p, r, f, n)
    ]


def table(results: dict[str, dict], variants: set[str]) -> dict[str, list]:
    """The comparison table as columns (model, role, then TABLE_COLUMNS; blank where it does not apply)."""
    cols: dict[str, list] = {"model": [], "role": [], **{c: [] for c in TABLE_COLUMNS}}
    for name, m in results.items():
        cols["model"].append(name)
        cols["role"].append("variant" if name in variants else "baseline")
        for c in TABLE_COLUMNS:
            v = m.get(c)
            cols[c].append(f"{v[0]:.4f}–{v[1]:.4f}" if isinstance(v, list) else "" if v is None else v)
    return cols


def markdown_report(
    cols: dict[str, list],
    front: list[str],
    lm: dict,
    skipped_variants: dict[str, str],
    artifacts: dict[str, dict],
    rows: dict[str, int],
    comparisons: list[str],
) -> str:
    """The Markdown report; `rows`: test rows in all (`test`) and `long`/`short`; `comparisons`: the lines of
    `versus_lines` and `length_lines`."""
    head = list(cols)
    lines = [
        "# Evaluation report",
        "",
        (
            f"{rows['test']} held-out test texts; every model scored on the same rows. "
            "Latency: one process, this machine's CPU threads;"
        ),
        (
            "`p50/p99_ms_bN` time whole requests of N texts (tokenization included), "
            "`tokenize_ms`/`forward_ms` their medians."
        ),
        "`peak_rss_mb`: resident memory added while loading and scoring the model. `params`: weights stored.",
        "`_ci95`: 95% intervals from a paired bootstrap over the test rows (the same resamples for every model).",
        (
            f"`macro_f1_long`: on the {rows['long']} texts of more than {LONG_TOKENS} tokens (untruncated); "
            f"`macro_f1_short`: on the other {rows['short']}."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for i in range(len(cols["model"])):
        lines.append("| " + " | ".join(str(cols[c][i]) for c in head) + " |")
    lines += ["", f"Pareto front (macro-F1 vs batch-1 p50 latency): {', '.join(front)}.", ""]
    if lm.get("test_perplexity") is not None:
        lines.append(f"Language model: test perplexity {lm['test_perplexity']} over {lm['test_tokens']} tokens.")
        if "bigram_test_perplexity" in lm:
            lines.append(
                "Next-token yardsticks counted on the training tokens, same targets: "
                f"unigram {lm['unigram_test_perplexity']}, "
                f"bigram {lm['bigram_test_perplexity']} (interpolation {lm['bigram_lambda']}) on the test functions"
                + (
                    f"; on the validation shard ({lm['val_tokens']} tokens) LM {lm['val_perplexity']}, "
                    f"unigram {lm['unigram_val_perplexity']}, bigram {lm['bigram_val_perplexity']}."
                    if "val_perplexity" in lm
                    else "."
                )
            )
    for name, why in skipped_variants.items():
        lines.append(f"Variant `{name}` not built: {why}.")
    lines += comparisons
    lines += ["", "## Artifacts scored", "", "| artifact | path | sha256 |", "|---|---|---|"]
    lines += [f"| {k} | {a['path']} | `{a['sha256']}` |" for k, a in artifacts.items()]
    return "\n".join(lines) + "\n"


def versus_lines(versus: dict[str, dict[str, dict]]) -> list[str]:
    """The report's table of every variant against every trained baseline on the same rows."""
    if not versus:
        return []
    lines = [
        "",
        "## Variants against the baselines (same test rows)",
        "",
        "Difference variant − baseline with its 95% interval; one-sided p-values that the variant is worse:",
        "paired bootstrap for macro-F1, exact McNemar for accuracy (uncorrected; promotion's `beats_baselines`",
        "corrects for the number of tests with Holm's method).",
        "",
        "| variant | baseline | macro-F1 diff | 95% CI | p (worse) | accuracy diff | 95% CI | p (worse, McNemar) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, against in versus.items():
        for b, c in against.items():
            f_lo, f_hi = c["macro_f1_diff_ci95"]
            a_lo, a_hi = c["accuracy_diff_ci95"]
            lines.append(
                f"| {v} | {b} | {c['macro_f1_diff']:+.4f} | {f_lo:+.4f}, {f_hi:+.4f} | {c['p_f1_worse']:.3g} | "
                f"{c['accuracy_diff']:+.4f} | {a_lo:+.4f}, {a_hi:+.4f} | {c['mcnemar']['p_a_worse']:.3g} |"
            )
    return lines


def compare_with_baselines(
    y_true: list[str], preds: dict[str, list[str]], labels: list[str], variants, baselines, resamples: Resamples
) -> dict[str, dict[str, dict]]:
    """variant -> trained baseline -> `stats.paired` of the two on the same test rows (majority excluded: it has
    its own gate)."""
    trained = [b for b in baselines if b != "majority"]
    return {v: {b: paired(y_true, preds[v], preds[b], labels, resamples).as_dict() for b in trained} for v in variants}


@dataclass(frozen=True)
class LengthPart:
    """A part of the test split (the long or the short functions): its row positions and its own resamples, drawn
    like the whole split's (same count and seed) and shared by every model, so comparisons on it stay paired."""

    name: str
    rows: np.ndarray
    resamples: Resamples

    def take(self, values: list) -> list:
        """The entries of `values` (one per test row) at this part's rows."""
        return [values[i] for i in self.rows]

    def labels(self, y_true: list[str], labels: list[str]) -> list[str]:
        """The labels of `labels` that occur in this part's rows (a label without rows has no F1 here)."""
        present = set(self.take(y_true))
        return [lab for lab in labels if lab in present]


def length_parts(counts: list[int], cfg: EvaluateConfig) -> list[LengthPart]:
    """The `long` test rows (more than LONG_TOKENS tokens, untruncated) and the `short` ones; an empty part is left
    out."""
    counts = np.asarray(counts)
    parts = {"long": np.flatnonzero(counts > LONG_TOKENS), "short": np.flatnonzero(counts <= LONG_TOKENS)}
    return [
        LengthPart(name, rows, Resamples(len(rows), cfg.bootstrap_resamples, cfg.seed))
        for name, rows in parts.items()
        if len(rows)
    ]


def length_scores(y_true: list[str], pred: list[str], labels: list[str], parts: list[LengthPart]) -> dict:
    """`macro_f1_long`/`macro_f1_short` of one model's predictions with their `_ci95` (None: no such rows)."""
    out: dict = {f"macro_f1_{name}{key}": None for name in ("long", "short") for key in ("", "_ci95")}
    for part in parts:
        truth, guess, present = part.take(y_true), part.take(pred), part.labels(y_true, labels)
        out[f"macro_f1_{part.name}"] = scores(truth, guess, present)["macro_f1"]
        out[f"macro_f1_{part.name}_ci95"] = score_intervals(truth, guess, present, part.resamples)["macro_f1_ci95"]
    return out


def compare_by_length(
    y_true: list[str], preds: dict[str, list[str]], labels: list[str], variants: list[str], parts: list[LengthPart]
) -> dict[str, dict[str, dict]]:
    """variant -> part (`long`, `short`) -> `stats.paired` of the variant and the `short` baseline (the 128-token
    model) on that part's rows, through `compare_with_baselines`; empty without that baseline."""
    if SHORT_BASELINE not in preds:
        return {}
    out: dict[str, dict[str, dict]] = {v: {} for v in variants}
    for part in parts:
        sub = {n: part.take(preds[n]) for n in [*variants, SHORT_BASELINE]}
        truth = part.take(y_true)
        versus = compare_with_baselines(
            truth, sub, part.labels(y_true, labels), variants, [SHORT_BASELINE], part.resamples
        )
        for v in variants:
            out[v][part.name] = versus[v][SHORT_BASELINE]
    return out


def length_lines(by_length: dict[str, dict[str, dict]]) -> list[str]:
    """The report's table of every variant against the `short` baseline on long and on short functions."""
    if not by_length:
        return []
    lines = [
        "",
        f"## Variants against the {LONG_TOKENS}-token model (`{SHORT_BASELINE}` baseline), long and short functions",
        "",
        f"Long: test functions of more than {LONG_TOKENS} tokens; short: the rest. Difference of macro-F1 variant −",
        "`short` on those rows with its 95% interval (paired bootstrap on those rows) and one-sided p-values.",
        "",
        "| variant | rows | n | macro-F1 | `short` | diff | 95% CI | p (better) | p (worse) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, parts in by_length.items():
        for part, c in parts.items():
            lo, hi = c["macro_f1_diff_ci95"]
            lines.append(
                f"| {v} | {part} | {c['rows']} | {c['macro_f1'][0]:.4f} | {c['macro_f1'][1]:.4f} | "
                f"{c['macro_f1_diff']:+.4f} | {lo:+.4f}, {hi:+.4f} | {c['p_f1_better']:.3g} | {c['p_f1_worse']:.3g} |"
            )
    return lines


def add_uncertainty(
    results: dict[str, dict],
    preds: dict[str, list[str]],
    model_labels: dict[str, list[str]],
    labels: list[str],
    y_true: list[str],
    variants: set[str],
    cfg: EvaluateConfig,
) -> dict[str, dict[str, dict]]:
    """Every model's `accuracy_ci95`/`macro_f1_ci95` and every variant's `vs_baselines`, all on one set of resamples."""
    resamples = Resamples(len(y_true), cfg.bootstrap_resamples, cfg.seed)
    for name, pred in preds.items():
        m = results[name]
        m |= score_intervals(y_true, pred, model_labels.get(name, labels), resamples)
        (alo, ahi), (flo, fhi) = m["accuracy_ci95"], m["macro_f1_ci95"]
        print(
            f"{name}: accuracy {m['accuracy']:.4f} [95% CI {alo:.4f}, {ahi:.4f}], "
            f"macro-F1 {m['macro_f1']:.4f} [95% CI {flo:.4f}, {fhi:.4f}]"
        )
    baselines = [n for n in results if n not in variants]
    versus = compare_with_baselines(y_true, preds, labels, [v for v in results if v in variants], baselines, resamples)
    for v, against in versus.items():
        results[v]["vs_baselines"] = against
    return versus


def add_length_scores(
    results: dict[str, dict],
    preds: dict[str, list[str]],
    model_labels: dict[str, list[str]],
    labels: list[str],
    y_true: list[str],
    parts: list[LengthPart],
) -> dict[str, dict[str, dict]]:
    """Every model's `macro_f1_long`/`macro_f1_short` with intervals and every variant's `vs_short` (the variants are
    the results with `vs_baselines`: run after `add_uncertainty`)."""
    for name, pred in preds.items():
        results[name] |= length_scores(y_true, pred, model_labels.get(name, labels), parts)
        print(f"{name}: macro-F1 long {results[name]['macro_f1_long']}, short {results[name]['macro_f1_short']}")
    variants = [n for n, m in results.items() if "vs_baselines" in m]
    by_length = compare_by_length(y_true, preds, labels, variants, parts)
    for v, against in by_length.items():
        results[v]["vs_short"] = against
    return by_length


def trained_baselines(folder: Path) -> dict[str, Path]:
    """Baseline model folders written by finetune (`<folder>/<name>/config.json`), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {d.name: d for d in sorted(folder.iterdir()) if (d / CONFIG).is_file()}


def model_kind(name: str, variants: set[str]) -> str:
    """What a model is: `baseline`, or a variant's format (`transformer`, `int8`, `onnx`, `onnx-int8`)."""
    if name not in variants:
        return "baseline"
    if "onnx" in name:
        return "onnx-int8" if name.endswith("int8") else "onnx"
    return "int8" if name.endswith("int8") else "transformer"


def model_metrics(m: dict) -> dict[str, float]:
    """One model's row of the comparison table as flat metrics; an interval `x_ci95` becomes `x_low` and `x_high`,
    and what was not measured for the model is left out."""
    out: dict[str, float] = {}
    for column in TABLE_COLUMNS:
        v = m.get(column)
        if isinstance(v, (list, tuple)) and len(v) == 2:
            base = column.removesuffix("_ci95")
            out[f"{base}_low"], out[f"{base}_high"] = float(v[0]), float(v[1])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[column] = float(v)
    return out


def predictions_table(texts: list[str], y_true: list[str], pred: list[str], confidence: list[float]) -> dict:
    """A model's test predictions as table columns: text (cut to PREDICTION_TEXT_CHARS), label, prediction and
    the probability of the predicted label."""
    return {
        "text": [t[:PREDICTION_TEXT_CHARS] for t in texts],
        "label": list(y_true),
        "prediction": list(pred),
        "confidence": [round(float(c), 4) for c in confidence],
    }


def log_models(tracker: Tracker, results: dict[str, dict], variants: set[str], tables: dict[str, dict]) -> None:
    """One child run per model, named after it: its tags, its flat metrics (`model_metrics`) and its predictions
    table (`tables[name]`, from `predictions_table`)."""
    for name, m in results.items():
        tags = {
            "variant": name,
            "kind": model_kind(name, variants),
            "role": "variant" if name in variants else "baseline",
            "pareto": str(bool(m.get("pareto"))).lower(),
        }
        with tracker.child(name, tags) as run:
            run.log_metrics(model_metrics(m))
            run.log_table(tables[name], PREDICTIONS_TABLE)


def run_metrics(metrics: dict) -> dict[str, float]:
    """What evaluate's own run logs: every numeric metric but the per-model ones (each model's child run has them)."""
    return numeric({k: v for k, v in metrics.items() if k not in ("variants", "baselines")})


def write_plot_data(
    y_true: list[str], y_pred: list[str], labels: list[str], results: dict[str, dict], folder: Path
) -> None:
    """CSV plot data for `dvc plots`: confusion (actual, predicted), per-class scores, macro-F1 vs latency."""
    folder = Path(folder)
    write_csv(
        folder / CONFUSION_PLOT,
        ({"actual": a, "predicted": p} for a, p in zip(y_true, y_pred)),
        ["actual", "predicted"],
    )
    write_csv(
        folder / PER_CLASS_PLOT, per_class(y_true, y_pred, labels), ["label", "precision", "recall", "f1", "support"]
    )
    points = [{"model": name, **m} for name, m in results.items() if "p50_ms_b1" in m]
    write_csv(folder / TRADEOFF_PLOT, points, ["model", "p50_ms_b1", "macro_f1", "accuracy"])


def run(cfg: EvaluateConfig, paths: Paths, tracker: Tracker | None = None) -> EvaluateResult:
    tracker = tracker or NullTracker()
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    train, test = data[data["split"] == "train"], data[data["split"] == "test"]
    if test.empty:
        raise UserError(f"{paths.clean_labeled}: no test rows")
    variant_dirs = built(paths)
    if not variant_dirs:
        raise UserError(f"{paths.classifier}: no fine-tuned classifier to evaluate; run finetune")
    mft = load_mft(paths.behavioral) if Path(paths.behavioral).is_file() else []
    tokenizer = Path(paths.tokenizer) / TOKENIZER_FILE
    artifacts = {
        name: {"path": str(f), "sha256": tree_sha256(f)}
        for name, f in (("tokenizer", tokenizer), ("labeled_data", paths.clean_labeled))
    }
    results: dict[str, dict] = {}
    preds: dict[str, list[str]] = {}
    confidence: dict[str, list[float]] = {}
    scorers: dict[str, Scorer] = {}
    texts = test["text"].tolist()
    y_true = test["label"].tolist()
    tok = load_tokenizer(tokenizer)
    counts = token_counts(tok, texts)
    parts = length_parts(counts, cfg)

    def evaluate(name: str, load: Callable[[], Scorer], folder: Path | None, behavioral: bool = False) -> None:
        if folder is not None:
            artifacts[name] = {
                "path": str(folder),
                "sha256": tree_sha256(folder),
            }  # hashed before loading: a change after is caught
        m, probs, scorer = score_model(load, test, cfg)
        scorers[name] = scorer
        preds[name] = [scorer.labels[i] for i in probs.argmax(1)]
        confidence[name] = probs.max(1).tolist()
        if behavioral:
            report = run_behavioral(
                lambda ts: scorer.predict(ts, cfg.batch_size),
                texts,
                mft,
                cfg.behavioral_sample,
                cfg.seed,
                labels=scorer.labels,
            )
            m["behavioral"] = report
            m["behavioral_min_pass_rate"] = report["min_pass_rate"]
        results[name] = m
        print(f"{name}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}")

    for name, folder in variant_dirs.items():
        evaluate(name, lambda f=folder: bundle_scorer(load_parts(tokenizer, f), f), folder, behavioral=True)
    labels = scorers[next(iter(variant_dirs))].labels
    majority = train["label"].value_counts().idxmax()
    results["majority"] = scores(y_true, [majority] * len(test), labels) | {"params": 0}
    preds["majority"] = [majority] * len(test)
    confidence["majority"] = [float((train["label"] == majority).mean())] * len(test)  # its class prior
    evaluate("tfidf_logreg", lambda: tfidf_scorer(train, labels, cfg), None)
    for name, folder in trained_baselines(paths.baselines).items():
        evaluate(name, lambda f=folder: bundle_scorer(load_parts(tokenizer, f), f), folder)
    by_length = np.argsort(-np.asarray(counts), kind="stable")[: cfg.latency_samples]
    longest = [texts[i] for i in by_length if counts[i] > LONG_TOKENS]  # batch-1 latency of reading them whole
    for name, t in timed(scorers, texts, cfg, longest).items():
        results[name].update(t)
        print(f"{name}: p50 {t['p50_ms_b1']:.3f} ms for 1 text, {t['p50_ms_b32']:.3f} ms for 32")
    lm = (
        lm_perplexity(
            Path(paths.lm),
            tok,
            texts,
            int(read_config(paths.lm)["config"]["block_size"]),
            Path(paths.tokens),
        )
        if (Path(paths.lm) / CONFIG).is_file()
        else {}
    )
    print(f"language model: {lm}")

    names = set(variant_dirs)
    model_labels = {n: scorers[n].labels for n in scorers}
    versus = add_uncertainty(results, preds, model_labels, labels, y_true, names, cfg)
    by_length = add_length_scores(results, preds, model_labels, labels, y_true, parts)
    sizes = {part.name: len(part.rows) for part in parts}
    rows = {"test": len(test), "long": sizes.get("long", 0), "short": sizes.get("short", 0)}
    best = max(names, key=lambda v: results[v]["macro_f1"])
    cols = table(results, names)
    off = skipped(paths)
    with atomic_dir(paths.evaluation) as d:
        predictions = test.assign(tokens=counts, **{f"pred_{k}": v for k, v in preds.items()})
        predictions.to_parquet(d / paths.predictions.name, index=False)
        for name in variant_dirs:
            fig = plot_confusion(
                y_true, preds[name], labels, f"Confusion matrix ({name}, test split)", d / f"confusion_{name}.png"
            )
            publish(tracker, fig, f"confusion/{name}.png")
        fig, front = plot_pareto(results, names, d / "pareto.png")
        publish(tracker, fig, "pareto.png")
        publish(
            tracker, plot_reliability({n: results[n] for n in variant_dirs}, d / "reliability.png"), "reliability.png"
        )
        comparisons = versus_lines(versus) + length_lines(by_length)
        report = markdown_report(cols, front, lm, off, artifacts, rows, comparisons) + stage_cost_report(paths.metrics)
        (d / REPORT).write_text(report)
        tracker.log_artifact(d / REPORT)
        tracker.log_table(cols, "comparison.json")
    write_plot_data(y_true, preds[best], labels, results, paths.plots)
    for m in results.values():
        m.pop("reliability", None)  # in the chart; metrics keep the ECE
    variants = {n: results[n] for n in variant_dirs}
    baselines = {n: m for n, m in results.items() if n not in names}
    for name, m in results.items():
        m["pareto"] = name in front
    log_models(tracker, results, names, {n: predictions_table(texts, y_true, preds[n], confidence[n]) for n in preds})
    return EvaluateResult(
        test_examples=len(test),
        test_examples_long=rows["long"],
        test_examples_short=rows["short"],
        long_tokens=LONG_TOKENS,
        variants=variants,
        baselines=baselines,
        artifacts=artifacts,
        language_model=lm,
        skipped_variants=off,
    )


def main() -> None:
    stage_main(
        "evaluate",
        lambda p, t: run(p.evaluate, p.paths, t).metrics,
        SECTIONS,
        RunOptions(logged=run_metrics, inputs=("clean_labeled",), context="evaluation"),
    )


if __name__ == "__main__":
    main()
