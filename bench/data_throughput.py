"""Data-stage throughput: clean + exact dedup, near-dup removal, PII scrubbing and GE validation on generated corpora.

    python bench/data_throughput.py                          # or: lmforge bench data_throughput
    python bench/data_throughput.py --sizes 5,20 --validate-rows 100000 --workdir /tmp/lmforge-data-bench

For each size in `--sizes` (MB of UTF-8 text, MB = 2^20 bytes) this writes a seeded synthetic corpus (parquet:
id, text, source, kind; one row group per `--row-group-mb`, never more than one row group in memory) of prose-like
and code-like documents of 0.5-8 KB, with planted exact duplicates, near-duplicates (an earlier document with a
few words replaced, inserted or deleted; Jaccard similarity of 5-word shingles >= 0.93, recorded per pair) and
PII (emails, IPv4 addresses, phone numbers, AWS / GitHub / OpenAI keys, `password = "..."`; every value recorded),
~5% of documents each. Then, each in a fresh subprocess (so peak RSS is that run's own), the clean stage's
`clean_file` runs twice on it, configured by params.yaml's `clean:` section: `clean` (normalization, filters, PII
scrubbing, exact dedup; near_dup off) and `near_dup` (the same plus near-dup removal). Only the `clean_file` call is
timed; MB/s counts the input's text bytes. Per core = MB/s divided by the cores this process may use
(os.sched_getaffinity), so a run that leaves a core idle is not flattered; MB per CPU-second is shown beside it.

Scores, from the outputs' ids and texts: exact-dup removal (share of planted pairs of which exactly one copy
survives), near_dup_recall (the same for near pairs), near-dup false positives (unplanted documents the near-dup
run removed that the clean run kept), pii_recall (share of planted values absent from their surviving document)
and PII false positives (documents without planted PII that carry a scrubber placeholder). Last,
validate_rows_per_s: the validate stage on a generated `--validate-rows`-row labeled set (id, text, label,
source, split), timed around the stage's call only.

Prints a per-size table, the targets with met / missed, and as its last line a JSON object: clean_mb_per_s,
dedup_mb_per_s (the near-dup pass), peak_rss_mb (each a dict per size), validate_rows_per_s, near_dup_recall,
pii_recall (each the worst size), targets, machine, and every run's details under `runs`. Without --workdir
everything is written to a temporary folder, each corpus deleted once measured; with it, corpora are kept there
and reused by later runs with the same size, seed and row-group size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MB = 2**20
DOC_BYTES = (512, 8192)
"""Document lengths (UTF-8 bytes) are log-uniform in this range: mean ~2.7 KB."""
CODE_SHARE = 0.4
"""Share of code-like documents; the rest are prose-like."""
EXACT_SHARE, NEAR_SHARE, PII_SHARE = 0.05, 0.05, 0.05
"""Shares of documents that are exact copies, near copies, or carry PII (disjoint)."""
NEAR_MIN_BYTES = 2500
"""Near-duplicates are made only from documents at least this long, so a few edits keep Jaccard >= 0.9."""
NEAR_MIN_JACCARD = 0.93
"""Every planted near-duplicate pair is at least this similar (Jaccard of 5-word shingle sets)."""
SHINGLE = 5
RESERVOIR = 2048
"""Earlier documents kept as candidates to copy (each copied once at most), so copies span row groups."""
PASSES = ("clean", "near_dup")

TARGETS = [
    # (key, what, value(result), passed(value))
    (
        "clean_mb_per_s_per_core",
        "clean + exact dedup >= 20 MB/s per core (worst size)",
        lambda r: _worst(r, "clean", "mb_per_s_per_core"),
        lambda v: v >= 20,
    ),
    (
        "dedup_mb_per_s_per_core",
        "near-dup >= 5 MB/s per core (worst size)",
        lambda r: _worst(r, "near_dup", "mb_per_s_per_core"),
        lambda v: v >= 5,
    ),
    (
        "peak_rss_ratio",
        "peak RSS at the largest size <= 1.2x the smallest's",
        lambda r: _rss_ratio(r),
        lambda v: v <= 1.2,
    ),
    ("near_dup_recall", "near_dup_recall >= 0.9 (worst size)", lambda r: r["near_dup_recall"], lambda v: v >= 0.9),
    ("pii_recall", "pii_recall >= 0.95 (worst size)", lambda r: r["pii_recall"], lambda v: v >= 0.95),
]


# ---------------------------------------------------------------------------------------------
# Vocabulary: every token is a word plus what follows it; documents are token ids rendered to bytes in one gather


@dataclass
class Vocab:
    table: np.ndarray  # uint8 (tokens, longest token): each token's UTF-8 bytes, zero-padded
    length: np.ndarray  # int64 per token: its byte length
    parts: tuple[int, ...]  # token id = mixed-radix number over these part counts (word, variant, suffix)
    probs: tuple[np.ndarray, ...]  # one distribution per part
    mean_bytes: float

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = np.zeros(n, np.int64)
        for count, p in zip(self.parts, self.probs):
            ids = ids * count + np.searchsorted(np.cumsum(p), rng.random(n) * p.sum()).clip(0, count - 1)
        return ids

    def render(self, tokens: np.ndarray, counts: np.ndarray) -> list[str]:
        """The documents made of consecutive runs of `counts` tokens, trailing blanks stripped."""
        lens = self.length[tokens]
        data = self.table[tokens][np.arange(self.table.shape[1]) < lens[:, None]].tobytes()
        end = np.cumsum(lens)
        begin = end - lens
        last = np.cumsum(counts) - 1
        first = last - counts + 1
        return [data[a:b].decode().rstrip() for a, b in zip(begin[first].tolist(), end[last].tolist())]


def _build(
    variants: list[list[str]], suffixes: list[str], word_p: np.ndarray, variant_p: list[float], suffix_p: list[float]
) -> Vocab:
    tokens = [(w + s).encode() for forms in variants for w in forms for s in suffixes]
    lengths = np.array([len(t) for t in tokens], np.int64)
    table = np.zeros((len(tokens), lengths.max()), np.uint8)
    for i, t in enumerate(tokens):
        table[i, : len(t)] = np.frombuffer(t, np.uint8)
    probs = (word_p, np.array(variant_p) / sum(variant_p), np.array(suffix_p) / sum(suffix_p))
    joint = (probs[0][:, None, None] * probs[1][None, :, None] * probs[2][None, None, :]).ravel()
    return Vocab(table, lengths, (len(variants), len(variant_p), len(suffixes)), probs, float(joint @ lengths))


def _zipf(n: int) -> np.ndarray:
    """Zipf-Mandelbrot frequencies by rank (the word lists are in random order, so rank = position)."""
    p = 1.0 / (np.arange(n) + 2.7) ** 1.07
    return p / p.sum()


ACCENTS = str.maketrans({"a": "á", "e": "é", "o": "ö", "u": "ü", "n": "ñ", "c": "ç", "i": "ï"})
KEYWORDS = [
    "self",
    "return",
    "def",
    "if",
    "for",
    "in",
    "None",
    "import",
    "not",
    "and",
    "0",
    "1",
    "2",
    "True",
    "False",
    "len",
    "range",
    "print",
    "class",
    "from",
]


def make_words(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct pronounceable ASCII words, most frequent first."""
    onsets = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl gr".split()
    vowels = "a e i o u ai ea ou io".split()
    codas = ["", "", "", "n", "r", "s", "t", "l", "nd", "st"]
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(1, 4))
        w = (
            "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(k))
            + codas[rng.integers(len(codas))]
        )
        words.setdefault(w)
    return list(words)


@dataclass
class Vocabs:
    prose: Vocab
    code: Vocab
    words: list[str]  # ASCII prose words, for edits and PII


def make_vocabs(rng: np.random.Generator) -> Vocabs:
    words = make_words(rng, 8000)
    accented = set(
        rng.choice(len(words), len(words) // 50, replace=False).tolist()
    )  # ~2% of words carry non-ASCII letters
    prose_forms = [
        [(w.translate(ACCENTS) if i in accented else w), (w.translate(ACCENTS) if i in accented else w).capitalize()]
        for i, w in enumerate(words)
    ]
    prose = _build(
        prose_forms,
        [" ", ", ", ". ", ".\n\n", "; ", ": ", "? ", " — ", "\n"],
        _zipf(len(words)),
        [0.92, 0.08],
        [0.80, 0.07, 0.06, 0.015, 0.01, 0.01, 0.005, 0.01, 0.02],
    )
    idents = KEYWORDS + [
        "_".join(words[j] for j in rng.integers(0, 2000, int(rng.integers(1, 4)))) for _ in range(3000)
    ]
    code = _build(
        [[w, "".join(p.capitalize() for p in w.split("_"))] for w in idents],
        [
            "(",
            ")",
            ", ",
            " = ",
            ".",
            ":\n    ",
            "\n    ",
            "\n",
            " + ",
            "[",
            "]",
            " ",
            ")\n    ",
            "):\n        ",
            "\n        ",
            " == ",
            "\n\t",
        ],
        _zipf(len(idents)),
        [0.9, 0.1],
        [0.10, 0.09, 0.10, 0.08, 0.12, 0.03, 0.08, 0.04, 0.03, 0.03, 0.03, 0.12, 0.05, 0.02, 0.05, 0.02, 0.01],
    )
    return Vocabs(prose, code, words[:4000])


def render_docs(v: Vocab, rng: np.random.Generator, n_bytes: np.ndarray) -> list[str]:
    """One document per target length (bytes), rendered in one vectorized gather."""
    if not len(n_bytes):
        return []
    counts = np.maximum(8, np.rint(n_bytes / v.mean_bytes)).astype(np.int64)
    return v.render(v.sample(rng, int(counts.sum())), counts)


# ---------------------------------------------------------------------------------------------
# Planted PII and near-duplicates

ALNUM = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"))
AWS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"))
SECRET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!@#$%^&*_-+"))
PII_KINDS = ("email", "ipv4", "phone", "aws_access_key", "github_token", "openai_key", "password")


def _chars(rng: np.random.Generator, alphabet: np.ndarray, n: int) -> str:
    return "".join(rng.choice(alphabet, n).tolist())


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_pii(rng: np.random.Generator, kind: str, words: list[str]) -> tuple[str, str]:
    """(value, the snippet that carries it) for one planted PII item of `kind`."""
    d = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    if kind == "email":
        v = (
            f"{_pick(rng, words)}.{_pick(rng, words)}{d(1, 99)}@{_pick(rng, words)}."
            f"{_pick(rng, ['com', 'org', 'net', 'io', 'de', 'co.uk'])}"
        )
        return v, _pick(rng, [f"write to {v} for", f"Contact: <{v}>", f'email = "{v}"', f"({v})"])
    if kind == "ipv4":
        v = f"{_pick(rng, [str(d(1, 126)), str(d(128, 223))])}.{d(0, 255)}.{d(0, 255)}.{d(1, 254)}"
        return v, _pick(rng, [f"host {v} is", f'ip = "{v}"', f"connect to {v}:{d(1024, 65535)} now", f"from {v},"])
    if kind == "phone":
        a, b, c = d(201, 989), d(200, 999), d(0, 9999)
        v = _pick(
            rng,
            [
                f"({a}) {b}-{c:04d}",
                f"{a}-{b}-{c:04d}",
                f"{a}.{b}.{c:04d}",
                f"+1 {a} {b} {c:04d}",
                f"+1-{a}-{b}-{c:04d}",
                f"+44 20 {d(7000, 8999)} {c:04d}",
                f"+49 30 {d(1000000, 99999999)}",
            ],
        )
        return v, _pick(rng, [f"call {v} today", f"Tel: {v}", f'phone = "{v}"', f"or {v}."])
    if kind == "aws_access_key":
        v = "AKIA" + _chars(rng, AWS, 16)
        return v, _pick(rng, [f'aws_access_key_id = "{v}"', f"AWS_ACCESS_KEY_ID={v}", f"key {v} in"])
    if kind == "github_token":
        v = "ghp_" + _chars(rng, ALNUM, 36)
        return v, _pick(rng, [f"GITHUB_TOKEN={v}", f'token: "{v}"', f"with {v} as"])
    if kind == "openai_key":
        v = _pick(rng, ["sk-", "sk-proj-"]) + _chars(rng, ALNUM, 48)
        return v, _pick(rng, [f'OPENAI_API_KEY="{v}"', f"api_key = '{v}'", f"key {v} for"])
    v = _chars(rng, SECRET, d(10, 20))
    return v, _pick(rng, [f'password = "{v}"', f'PASSWORD="{v}"', f"db_password = '{v}'", f'"password": "{v}"'])


def plant_pii(text: str, rng: np.random.Generator, words: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """`text` with 1-3 PII snippets inserted at word boundaries; returns it and the planted (kind, value)s."""
    planted = []
    for _ in range(int(rng.integers(1, 4))):
        kind = PII_KINDS[int(rng.integers(len(PII_KINDS)))]
        value, snippet = make_pii(rng, kind, words)
        at = text.find(" ", int(rng.integers(len(text))))
        at = len(text) if at < 0 else at
        text = f"{text[:at]} {snippet}{text[at:]}"
        planted.append((kind, value))
    return text, planted


def shingles(text: str, k: int = SHINGLE) -> set[tuple[str, ...]]:
    w = text.split()
    return {tuple(w[i : i + k]) for i in range(max(1, len(w) - k + 1))}


def jaccard(a: str, b: str, k: int = SHINGLE) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb)


def near_copy(text: str, rng: np.random.Generator, words: list[str]) -> tuple[str, float]:
    """`text` with a few words replaced, inserted or deleted (up to one edit per 300 words),
    and its Jaccard to `text`."""
    for edits in (max(1, len(text.split(" ")) // 300), 1):
        parts = text.split(" ")
        for _ in range(int(rng.integers(1, edits + 1))):
            at = int(rng.integers(1, len(parts) - 1))
            while not parts[at].strip():  # a word, not indentation
                at = int(rng.integers(1, len(parts) - 1))
            op = int(rng.integers(3))
            if op == 0 and len(parts) > 3:
                del parts[at]
            elif op == 1:
                parts.insert(at, _pick(rng, words))
            else:
                parts[at] = _pick(rng, words) if parts[at] != words[0] else words[1]
        copy = " ".join(parts)
        if copy != text:
            j = jaccard(text, copy)
            if j >= NEAR_MIN_JACCARD:
                return copy, j
    copy = text.replace(" ", f" {words[0]} ", 1)  # one inserted word: always above the threshold at NEAR_MIN_BYTES
    return copy, jaccard(text, copy)


# ---------------------------------------------------------------------------------------------
# Corpus


def generate_corpus(path: Path, size_mb: float, seed: int = 1337, row_group_mb: float = 16) -> dict:
    """Write a corpus of `size_mb` MB of text to `path` (parquet: id, text, source, kind), one row group per
    `row_group_mb`; returns what was planted: exact / near pairs [source id, copy id(, jaccard)],
    pii [id, kind, value]."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng([seed, int(size_mb * 1000)])
    voc = make_vocabs(np.random.default_rng(seed))
    target = int(size_mb * MB)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("kind", pa.string())])
    planted: dict = {"exact": [], "near": [], "pii": []}
    pool_exact: list[tuple[int, str]] = []
    pool_near: list[tuple[int, str]] = []
    written = next_id = 0

    def remember(pool: list, item: tuple[int, str]) -> None:
        if len(pool) < RESERVOIR:
            pool.append(item)
        else:
            pool[int(rng.integers(RESERVOIR))] = item

    def take(pool: list) -> tuple[int, str] | None:
        if not pool:
            return None
        i = int(rng.integers(len(pool)))
        pool[i], pool[-1] = pool[-1], pool[i]
        return pool.pop()

    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while written < target:
            want = min(row_group_mb * MB, target - written)
            lo, hi = np.log(DOC_BYTES[0]), np.log(DOC_BYTES[1])
            n = max(1, int(want / ((DOC_BYTES[1] - DOC_BYTES[0]) / (hi - lo)) * 1.3) + 4)
            n_bytes = np.exp(rng.uniform(lo, hi, n))
            n = max(1, int(np.searchsorted(np.cumsum(n_bytes), want)) + 1)
            n_bytes = n_bytes[:n]
            is_code = rng.random(n) < CODE_SHARE
            texts = np.empty(n, object)
            texts[is_code] = render_docs(voc.code, rng, n_bytes[is_code])
            texts[~is_code] = render_docs(voc.prose, rng, n_bytes[~is_code])
            role = np.searchsorted(
                np.cumsum([EXACT_SHARE, NEAR_SHARE, PII_SHARE]), rng.random(n), side="right"
            )  # 0 exact, 1 near, 2 pii, 3 plain
            ids, out, sources, kinds = [], [], [], []
            for i in range(n):
                doc_id, text, kind = next_id + i, texts[i], "code" if is_code[i] else "text"
                if role[i] == 0 and (src := take(pool_exact)):
                    text = src[1]
                    planted["exact"].append([src[0], doc_id])
                elif role[i] == 1 and (src := take(pool_near)):
                    text, j = near_copy(src[1], rng, voc.words)
                    planted["near"].append([src[0], doc_id, round(j, 4)])
                elif role[i] == 2:
                    text, pii = plant_pii(text, rng, voc.words)
                    planted["pii"] += [[doc_id, k, v] for k, v in pii]
                else:
                    remember(
                        pool_near if len(text) >= NEAR_MIN_BYTES and rng.random() < 0.5 else pool_exact, (doc_id, text)
                    )
                ids.append(doc_id)
                out.append(text)
                sources.append(
                    f"synthetic/{kind}/{doc_id // 1000:05d}/{doc_id:08d}.{'py' if kind == 'code' else 'txt'}"
                )
                kinds.append(kind)
            table = pa.table({"id": ids, "text": out, "source": sources, "kind": kinds}, schema=schema)
            writer.write_table(table, row_group_size=n)
            written += pc.sum(pc.binary_length(table["text"])).as_py()
            next_id += n
    near_j = [p[2] for p in planted["near"]]
    return {
        **planted,
        "docs": next_id,
        "text_bytes": written,
        "near_jaccard_min": min(near_j, default=None),
        "near_jaccard_mean": round(float(np.mean(near_j)), 4) if near_j else None,
    }


# ---------------------------------------------------------------------------------------------
# Labeled set for validation

LABELED_BYTES = (60, 600)
SPLIT_CYCLE = [
    "train",
    "val",
    "train",
    "test",
    "train",
    "train",
    "val",
    "train",
    "test",
    "train",
    "train",
    "train",
    "val",
    "train",
    "test",
    "train",
    "train",
    "train",
    "train",
    "train",
]
"""Each source file lies in one split: 14 train, 3 val, 3 test of every 20 files of a label."""


def generate_labeled(n: int, labels: list[str], seed: int = 1337, chunk: int = 200_000):
    """`n` unique labeled rows (id, text, label, source, split) as the ingest stage writes them: code-like texts of
    60-600 bytes, a label per source file, each file in one split, every label in every split."""
    import pandas as pd

    rng = np.random.default_rng([seed, n])
    voc = make_vocabs(np.random.default_rng(seed))
    lo, hi = np.log(LABELED_BYTES[0]), np.log(LABELED_BYTES[1])
    texts: list[str] = []
    for start in range(0, n, chunk):
        texts += render_docs(voc.code, rng, np.exp(rng.uniform(lo, hi, min(chunk, n - start))))
    text = pd.Series(texts, dtype=object)
    bad = text.duplicated() | (text.str.len() < 40)
    text[bad] = [f"{t} # row {i} of the labeled set" for i, t in zip(np.flatnonzero(bad), text[bad])]
    per_file = max(1, min(20, n // (20 * len(labels))))
    file = np.arange(n) // per_file
    label = np.asarray(labels, object)[file % len(labels)]
    split = np.asarray(SPLIT_CYCLE, object)[(file // len(labels)) % len(SPLIT_CYCLE)]
    source = [f"{lab}/module_{f:07d}.py" for lab, f in zip(label, file.tolist())]
    ids = [f"{src}#{i}" for i, src in enumerate(source)]
    return pd.DataFrame({"id": ids, "text": text, "label": label, "source": source, "split": split})


def validate_labeled(labeled, folder: Path, params: dict) -> tuple[float, dict]:
    """Seconds the validate stage takes on `labeled` (with a small valid corpus beside it: every checkpoint runs), and
    its summary. The only place that knows the validate stage's API: `tasks.validate.run` on files under `folder`."""
    from tasks import validate
    from tasks.shared.config.base import Paths
    from tasks.shared.config.clean import CleanConfig
    from tasks.shared.config.validate import ValidateConfig

    tracked = {"gx", "expectations"}  # the data contract lives in the repository; everything else goes under `folder`
    paths = Paths(**{k: (ROOT if k in tracked else folder) / v for k, v in params["paths"].items()})
    corpus = (
        labeled[["id", "text", "source"]].head(max(params["validate"]["min_corpus_rows"], 1000)).assign(kind="code")
    )
    for frame, path in ((corpus, paths.clean_corpus), (labeled, paths.clean_labeled)):
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    packages = sorted(set(labeled["label"]))
    t0 = time.perf_counter()
    try:
        summary = validate.run(
            ValidateConfig(**params["validate"]), CleanConfig(**params["clean"]), packages, True, paths
        ).metrics
    except Exception as e:  # a failed contract still timed every check: report it beside the figure
        summary = {"success": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return time.perf_counter() - t0, summary


# ---------------------------------------------------------------------------------------------
# Child processes: one pass each, so peak RSS is that pass's own


def load_params(path: Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_clean(src: Path, dst: Path, near_dup: bool, params: dict) -> dict:
    """One clean_file pass over the corpus `src` (timed: the call only)."""
    from tasks.shared.cleaning.files import clean_file
    from tasks.shared.config.clean import CleanConfig

    cfg = CleanConfig(**{**(params.get("clean") or {}), "near_dup": near_dup})
    cpu0, t0 = _cpu_s(), time.perf_counter()
    report = clean_file(src, dst, cfg, "corpus", progress=False)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "report": report, "config": cfg.model_dump(mode="json")}


def child_validate(rows: int, folder: Path, params: dict, seed: int) -> dict:
    """The validate stage on a generated `rows`-row labeled set (timed: the stage's call only)."""
    labels = list(params.get("ingest", {}).get("packages") or ["asyncio", "email", "http", "json", "xml"])
    labeled = generate_labeled(rows, labels, seed)
    cpu0 = _cpu_s()
    seconds, summary = validate_labeled(labeled, folder, params)
    return {"seconds": seconds, "cpu_s": _cpu_s() - cpu0, "rows": rows, "summary": summary}


def run_child(args: list[str], folder: Path) -> dict:
    """Run this script as `--child ...` in a fresh interpreter; its result plus peak RSS (MB) and wall seconds.

    Peak RSS is the larger of the child's own ru_maxrss (wait4, so this child alone) and the highest RSS summed
    over the child and its descendants, sampled every 50 ms when psutil is installed (worker processes, if the
    code under test uses any).
    """
    try:
        import psutil
    except ImportError:  # not a declared dependency: wait4's figure alone then
        psutil = None
    out = folder / f"child-{time.monotonic_ns()}.json"
    err = folder / f"{out.stem}.stderr"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", *args, "--child-out", str(out)]
    t0 = time.perf_counter()
    with open(err, "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
    tree_peak = 0
    ps = psutil.Process(proc.pid) if psutil else None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            if ps:
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:  # it (or a worker) just exited
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        raise RuntimeError(
            f"child {' '.join(args[:1])} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
        )
    result = json.loads(out.read_text())
    out.unlink()
    err.unlink()
    return {
        **result,
        "peak_rss_mb": round(max(usage.ru_maxrss * 1024, tree_peak) / MB, 1),
        "child_wall_s": round(wall, 2),
    }


# ---------------------------------------------------------------------------------------------
# Scores


def placeholder_pattern() -> str:
    """A regex for the scrubber's placeholders (<EMAIL>, ...); the generated text never contains '<'."""
    import re

    from tasks.shared.cleaning.pii import PLACEHOLDERS

    return "|".join(re.escape(p) for p in PLACEHOLDERS.values())


def score(out_path: Path, planted: dict, n_docs: int, kept_before: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
    """What a pass kept, against what was planted; returns the scores and the kept-mask by id.

    `kept_before` (the clean pass's mask) makes unplanted documents this pass removed and that one kept false
    positives of near-dup removal. A scrubber placeholder in a document without planted PII is a PII false positive.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    kept = np.zeros(n_docs, bool)
    pii_ids = np.array(sorted({p[0] for p in planted["pii"]}), np.int64)
    values: dict[int, list[tuple[str, str]]] = {}
    for doc, kind, value in planted["pii"]:
        values.setdefault(doc, []).append((kind, value))
    found = {k: [0, 0] for k in PII_KINDS}  # kind: [still present, checked]
    out_bytes = over_scrubbed = 0
    placeholder = placeholder_pattern()
    f = pq.ParquetFile(out_path)
    for batch in f.iter_batches(columns=["id", "text"], batch_size=4096):
        ids = pc.cast(
            batch.column("id"), pa.int64()
        ).to_numpy()  # clean_file keeps the input's ids (as strings if it made them)
        kept[ids] = True
        text = batch.column("text")
        out_bytes += pc.sum(pc.binary_length(text)).as_py() or 0
        scrubbed = pc.match_substring_regex(text, placeholder).to_numpy(zero_copy_only=False)
        over_scrubbed += int((scrubbed & ~np.isin(ids, pii_ids)).sum())  # a placeholder where nothing was planted
        for row in np.flatnonzero(np.isin(ids, pii_ids)).tolist():
            doc, body = int(ids[row]), text[row].as_py()
            for kind, value in values[doc]:
                found[kind][0] += value in body
                found[kind][1] += 1
    r: dict = {"docs_out": int(kept.sum()), "text_mb_out": round(out_bytes / MB, 3)}
    for name, pairs in (("exact", planted["exact"]), ("near", planted["near"])):
        a = np.array([p[:2] for p in pairs], np.int64).reshape(-1, 2)
        one = kept[a[:, 0]] ^ kept[a[:, 1]]
        r[f"{name}_pairs"] = len(a)
        r[f"{name}_one_survives"] = _ratio(int(one.sum()), len(a))
        r[f"{name}_both_kept"] = int((kept[a[:, 0]] & kept[a[:, 1]]).sum())
        r[f"{name}_both_removed"] = int((~kept[a[:, 0]] & ~kept[a[:, 1]]).sum())
    planted_member = np.zeros(n_docs, bool)
    for pairs in (planted["exact"], planted["near"]):
        for p in pairs:
            planted_member[p[0]] = planted_member[p[1]] = True
    r["unplanted_removed"] = int((~kept & ~planted_member).sum())
    if kept_before is not None:
        fp = ~kept & kept_before & ~planted_member
        r["near_false_positives"] = int(fp.sum())
        r["near_false_positive_rate"] = _ratio(int(fp.sum()), int((~planted_member).sum()))
    checked = sum(c for _, c in found.values())
    r["pii_values_checked"] = checked
    r["pii_values_planted"] = len(planted["pii"])
    r["pii_recall"] = _ratio(checked - sum(p for p, _ in found.values()), checked)
    r["pii_recall_by_kind"] = {k: _ratio(c - p, c) for k, (p, c) in found.items() if c}
    r["pii_false_positive_docs"] = over_scrubbed
    return r, kept


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


# ---------------------------------------------------------------------------------------------
# The benchmark


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gb = None
    import pyarrow

    return {
        "cpu": cpu,
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _key(size: float) -> str:
    return f"{size:g}"


def _worst(r: dict, pass_: str, key: str) -> float | None:
    vals = [run[pass_][key] for run in r["runs"].values() if run[pass_].get(key) is not None]
    return min(vals) if vals else None


def _rss_ratio(r: dict) -> float | None:
    sizes = sorted(r["runs"], key=float)
    if len(sizes) < 2:
        return None
    return round(r["peak_rss_mb"][sizes[-1]] / r["peak_rss_mb"][sizes[0]], 3)


def bench_size(size: float, folder: Path, seed: int, row_group_mb: float, params_path: Path, keep: bool, log) -> dict:
    """Generate (or reuse) one corpus, run both passes on it in fresh processes, score them."""
    corpus = folder / f"corpus-{_key(size)}mb-seed{seed}-rg{_key(row_group_mb)}.parquet"
    meta = corpus.with_suffix(".planted.json")
    generate_s = None
    if corpus.exists() and meta.exists():
        planted = json.loads(meta.read_text())
        log(f"{_key(size)} MB: reusing {corpus}")
    else:
        t0 = time.perf_counter()
        planted = generate_corpus(corpus, size, seed, row_group_mb)
        generate_s = round(time.perf_counter() - t0, 1)
        meta.write_text(json.dumps(planted))
        log(f"{_key(size)} MB: generated {planted['docs']:,} documents in {generate_s} s")
    text_mb = planted["text_bytes"] / MB
    per: dict = {
        "corpus": {
            "docs": planted["docs"],
            "text_mb": round(text_mb, 2),
            "file_mb": round(corpus.stat().st_size / MB, 1),
            "generate_s": generate_s,
            "exact_pairs": len(planted["exact"]),
            "near_pairs": len(planted["near"]),
            "pii_values": len(planted["pii"]),
            "pii_docs": len({p[0] for p in planted["pii"]}),
            "near_jaccard_min": planted["near_jaccard_min"],
            "near_jaccard_mean": planted["near_jaccard_mean"],
        }
    }
    kept_clean = None
    try:
        for pass_ in PASSES:
            dst = folder / f"out-{_key(size)}mb-{pass_}.parquet"
            c = run_child(
                ["clean", "--src", str(corpus), "--dst", str(dst), "--params", str(params_path)]
                + (["--near-dup"] if pass_ == "near_dup" else []),
                folder,
            )
            scores, kept = score(dst, planted, planted["docs"], kept_clean)
            kept_clean = kept if pass_ == "clean" else kept_clean
            mb_per_s = text_mb / c["seconds"]
            per[pass_] = {
                "seconds": round(c["seconds"], 2),
                "cpu_s": round(c["cpu_s"], 2),
                "mb_per_s": round(mb_per_s, 2),
                "mb_per_s_per_core": round(mb_per_s / cores(), 2),
                "mb_per_cpu_s": round(text_mb / c["cpu_s"], 2) if c["cpu_s"] else None,
                "peak_rss_mb": c["peak_rss_mb"],
                "child_wall_s": c["child_wall_s"],
                "output_file_mb": round(dst.stat().st_size / MB, 1),
                **scores,
                "report": c["report"],
            }
            dst.unlink()
            log(f"{_key(size)} MB {pass_}: {mb_per_s:.1f} MB/s, peak RSS {c['peak_rss_mb']:.0f} MB")
    finally:
        if not keep:
            corpus.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
    return per


def run(
    sizes: list[float],
    validate_rows: int,
    workdir: Path | None = None,
    seed: int = 1337,
    row_group_mb: float = 16,
    params_path: Path = ROOT / "params.yaml",
    log=lambda line: None,
) -> dict:
    """The whole benchmark; see the module docstring. With `workdir`, corpora stay there and are reused
    by later runs."""
    load_params(params_path)  # a bad params file fails before any corpus is generated
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lmforge-data-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        runs = {
            _key(s): bench_size(s, folder, seed, row_group_mb, params_path, workdir is not None, log) for s in sizes
        }
        validation = None
        if validate_rows:
            v = run_child(
                [
                    "validate",
                    "--rows",
                    str(validate_rows),
                    "--folder",
                    str(folder / "validate"),
                    "--params",
                    str(params_path),
                    "--seed",
                    str(seed),
                ],
                folder,
            )
            shutil.rmtree(folder / "validate", ignore_errors=True)
            validation = {
                "rows": v["rows"],
                "seconds": round(v["seconds"], 2),
                "rows_per_s": round(v["rows"] / v["seconds"], 1),
                "peak_rss_mb": v["peak_rss_mb"],
                "success": v["summary"].get("success"),
                "summary": v["summary"],
            }
            log(f"validate: {validation['rows_per_s']:,.0f} rows/s")
    finally:
        if not workdir:
            shutil.rmtree(folder, ignore_errors=True)
    r: dict = {
        "sizes_mb": [float(s) for s in sizes],
        "clean_mb_per_s": {k: v["clean"]["mb_per_s"] for k, v in runs.items()},
        "dedup_mb_per_s": {k: v["near_dup"]["mb_per_s"] for k, v in runs.items()},
        "clean_mb_per_s_per_core": {k: v["clean"]["mb_per_s_per_core"] for k, v in runs.items()},
        "dedup_mb_per_s_per_core": {k: v["near_dup"]["mb_per_s_per_core"] for k, v in runs.items()},
        "peak_rss_mb": {k: max(v["clean"]["peak_rss_mb"], v["near_dup"]["peak_rss_mb"]) for k, v in runs.items()},
        "validate_rows_per_s": validation["rows_per_s"] if validation else None,
        "runs": runs,
        "validate": validation,
    }
    r["near_dup_recall"] = _worst(r, "near_dup", "near_one_survives")
    r["exact_dup_removal"] = min(filter(None, [_worst(r, p, "exact_one_survives") for p in PASSES]), default=None)
    r["near_dup_false_positives"] = {k: v["near_dup"]["near_false_positives"] for k, v in runs.items()}
    r["pii_recall"] = min(filter(lambda x: x is not None, [_worst(r, p, "pii_recall") for p in PASSES]), default=None)
    r["targets"] = {}
    for key, what, value, passed in TARGETS:
        v = value(r)
        r["targets"][key] = {"what": what, "value": v, "met": None if v is None else bool(passed(v))}
    r["machine"] = machine()
    r["seed"], r["row_group_mb"] = seed, row_group_mb
    return r


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(r: dict) -> list[str]:
    """The report: one row per size and pass, the validation line, the targets."""
    head = [
        "size MB",
        "docs",
        "pass",
        "seconds",
        "MB/s",
        "MB/s/core",
        "MB/CPU-s",
        "peak RSS MB",
        "removed",
        "exact 1-of-2",
        "near 1-of-2",
        "near FP",
        "PII recall",
        "PII FP docs",
    ]
    rows = []
    for k, run in r["runs"].items():
        for p in PASSES:
            x = run[p]
            rows.append(
                [
                    k,
                    _fmt(run["corpus"]["docs"]),
                    p,
                    _fmt(x["seconds"], 2),
                    _fmt(x["mb_per_s"]),
                    _fmt(x["mb_per_s_per_core"]),
                    _fmt(x["mb_per_cpu_s"]),
                    _fmt(x["peak_rss_mb"], 0),
                    _fmt(run["corpus"]["docs"] - x["docs_out"]),
                    _fmt(x["exact_one_survives"], 3),
                    _fmt(x["near_one_survives"], 3) if p == "near_dup" else "-",
                    _fmt(x.get("near_false_positives")) if p == "near_dup" else "-",
                    _fmt(x["pii_recall"], 3),
                    _fmt(x["pii_false_positive_docs"]),
                ]
            )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for k, run in r["runs"].items():
        c = run["corpus"]
        out.append(
            f"{k} MB corpus: {c['docs']:,} docs, {c['text_mb']} MB text, {c['file_mb']} MB parquet; "
            f"planted {c['exact_pairs']} exact and "
            f"{c['near_pairs']} near pairs (Jaccard min {c['near_jaccard_min']}, mean {c['near_jaccard_mean']}), "
            f"{c['pii_values']} PII values in {c['pii_docs']} docs"
        )
    v = r["validate"]
    if v:
        out.append(
            f"validate: {v['rows']:,} labeled rows in {v['seconds']} s = {v['rows_per_s']:,.0f} rows/s "
            f"(peak RSS {v['peak_rss_mb']:.0f} MB, contract {'passed' if v['success'] else 'FAILED'})"
        )
    m = r["machine"]
    out.append(
        f"machine: {m['cpu']}, {m['cores']} usable cores (os.cpu_count() {m['cpu_count']}), {m['memory_gb']} GB; "
        f"per core = MB/s / {m['cores']}"
    )
    out.append("")
    w = max(len(t["what"]) for t in r["targets"].values())
    out.append(f"{'target'.ljust(w)}  {'value':>9}  result")
    out.append(f"{'-' * w}  {'-' * 9}  ------")
    for t in r["targets"].values():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.append(f"{t['what'].ljust(w)}  {_fmt(t['value'], 3):>9}  {verdict}")
    return out


def _child(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if args.child == "clean":
        result = child_clean(Path(args.src), Path(args.dst), args.near_dup, params)
    else:
        result = child_validate(args.rows, Path(args.folder), params, args.seed)
    Path(args.child_out).write_text(json.dumps(result, default=str))


def _sizes(text: str) -> list[float]:
    try:
        sizes = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes {text!r}: give MB as comma-separated numbers, e.g. 250,1024"
        ) from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: every size must be > 0")
    return sizes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        type=_sizes,
        default=[250.0, 1024.0],
        help="corpus sizes in MB of text (2^20 bytes), comma-separated (default 250,1024)",
    )
    ap.add_argument("--validate-rows", type=int, default=1_000_000, help="labeled rows to validate (0: skip)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep (and reuse) corpora here instead of a temporary folder"
    )
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument(
        "--row-group-mb", type=float, default=16, help="MB of text per parquet row group of the generated corpora"
    )
    ap.add_argument(
        "--params",
        type=Path,
        default=ROOT / "params.yaml",
        help="params.yaml whose clean / validate sections configure the passes",
    )
    ap.add_argument("--child", choices=["clean", "validate"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--near-dup", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    if args.validate_rows < 0:
        ap.error("--validate-rows must be >= 0")
    if not args.params.is_file():
        raise SystemExit(f"data_throughput: {args.params}: no such params file")
    try:
        r = run(
            args.sizes,
            args.validate_rows,
            args.workdir,
            args.seed,
            args.row_group_mb,
            args.params,
            log=lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True),
        )
    except RuntimeError as e:
        raise SystemExit(f"data_throughput: {e}") from None
    print("\n".join(table(r)))
    print(json.dumps(r, default=str))


if __name__ == "__main__":
    main()
