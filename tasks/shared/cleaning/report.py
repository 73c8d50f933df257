"""The cleaning report: what each filter removed or changed, why, and a few examples (after PII scrubbing)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tasks.shared.cleaning.dedup import lsh_bands
from tasks.shared.cleaning.pii import PII_TYPES, PLACEHOLDERS
from tasks.shared.config.clean import CleanConfig

SNIPPET = 60
"""Characters of a text an example shows."""
EXAMPLES = 3
"""Examples kept per filter."""
CHANGES = ("normalized", "pii", "label_normalized")
"""Steps that change rows; every other entry of a report removes them."""
COUNTS = ("cross_split_duplicates",)
"""Counts within another filter's removals."""


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell: placeholders such as <EMAIL> shown, not taken for HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _snippet(text: str) -> str:
    return repr(text[:SNIPPET] + ("…" if len(text) > SNIPPET else ""))


@dataclass
class DatasetReport:
    """What cleaning did to one dataset: counts, PII by type and a few examples per filter."""

    name: str
    why: dict[str, str]
    input_rows: int = 0
    output_rows: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    removed: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def wants(self, key: str) -> bool:
        """Whether `key` has room for another example."""
        return len(self.examples.get(key, ())) < EXAMPLES

    def example(self, key: str, row_id, text: str, note: str = "") -> None:
        """Keep `text` (its start) as an example of `key`, if `key` has room for one."""
        got = self.examples.setdefault(key, [])
        if len(got) < EXAMPLES:
            got.append(f"{row_id}{f' ({note})' if note else ''}: {_snippet(text)}")

    def remove(self, key: str, row_id, text: str, note: str = "") -> None:
        """Count a row that filter `key` removed, with it as an example."""
        self.removed[key] += 1
        self.example(key, row_id, text, note)

    def merge(self, part: "DatasetReport") -> None:
        """Add the counts and examples of `part`, a report of the rows after those seen so far: the result is
        the report of all of them (counters keep the order in which their keys first occurred)."""
        for mine, theirs in (
            (self.removed, part.removed),
            (self.changed, part.changed),
            (self.pii, part.pii),
            (self.extra, part.extra),
        ):
            mine.update(theirs)
        for key, shown in part.examples.items():
            got = self.examples.setdefault(key, [])
            got += shown[: EXAMPLES - len(got)]

    def metrics(self) -> dict:
        """Numbers only (the DVC metric): rows and bytes in and out, rows removed/changed per filter, PII by type."""
        return {
            "input_rows": self.input_rows,
            "output_rows": self.output_rows,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "removed": {k: self.removed[k] for k in self.why if k not in CHANGES + COUNTS},
            "changed": {k: self.changed[k] for k in self.why if k in CHANGES},
            "pii": {k: self.pii[k] for k in PII_TYPES},
            **{k: self.extra[k] for k in self.why if k in COUNTS},
        }

    def line(self) -> str:
        """One stdout line."""
        parts = [f"{n} {k}" for k, n in self.removed.items() if n] + [
            f"{n} {k} (changed)" for k, n in self.changed.items() if n
        ]
        mb = f"{self.input_bytes / 1e6:.1f} -> {self.output_bytes / 1e6:.1f} MB"
        return (
            f"clean: {self.name}: kept {self.output_rows} of {self.input_rows} rows ({mb})"
            f"{': ' + ', '.join(parts) if parts else ''}"
        )

    def markdown(self) -> str:
        """A table: filter, rows removed or changed, share of input rows, why, examples (id: text)."""
        out = [
            f"## {self.name}",
            "",
            f"{self.input_rows} rows ({self.input_bytes / 1e6:.2f} MB of text) in, {self.output_rows} rows "
            f"({self.output_bytes / 1e6:.2f} MB) out.",
            "",
            "| filter | rows | share | why | examples |",
            "|---|---:|---:|---|---|",
        ]
        for key, why in self.why.items():
            n, verb = (
                (self.changed[key], "changed")
                if key in CHANGES
                else (self.extra[key], "")
                if key in COUNTS
                else (self.removed[key], "removed")
            )
            share = f"{n / self.input_rows:.2%}" if self.input_rows else "-"
            ex = "<br>".join(_cell(e) for e in self.examples.get(key, [])) or "-"
            out.append(f"| {key} | {f'{n} {verb}'.strip()} | {share} | {why} | {ex} |")
        if any(self.pii.values()):
            out += [
                "",
                "PII replaced: "
                + ", ".join(f"{n} {k} ({_cell(PLACEHOLDERS[k])})" for k, n in self.pii.items() if n)
                + ".",
            ]
        return "\n".join(out) + "\n"


def filter_reasons(cfg: CleanConfig, kind: str) -> dict[str, str]:
    """Every step that cleaning a `kind` dataset ('corpus' or 'labeled') runs, in order, and what it does (or "off")."""
    why = _text_reasons(cfg, kind)
    if kind == "labeled":
        why["label_normalized"] = f"label case {cfg.label_case}, whitespace collapsed, {len(cfg.label_aliases)} aliases"
        why["empty_label"] = "label empty after cleanup"
        why["label_conflicts"] = "the same text with different labels: every copy removed"
    why["duplicates"] = (
        ("identical to an earlier text" + (" (train copies first)" if kind == "labeled" else ""))
        if cfg.exact_dedup
        else "off"
    )
    why["near_duplicates"] = (
        f"word {cfg.near_dup_shingle}-gram Jaccard above ~{cfg.near_dup_threshold} with an earlier kept text "
        f"(MinHash {cfg.near_dup_num_perm} permutations, "
        f"LSH {'x'.join(map(str, lsh_bands(cfg.near_dup_threshold, cfg.near_dup_num_perm)))})"
        if cfg.near_dup
        else "off"
    )
    if kind == "labeled":
        why["cross_split_duplicates"] = (
            "removed duplicates whose kept copy is in another split (counted within duplicates)"
        )
    return why


def _text_reasons(cfg: CleanConfig, kind: str) -> dict[str, str]:
    """The per-text steps of filter_reasons: normalization, PII, length and quality filters."""
    max_chars = cfg.max_chars if kind == "corpus" else cfg.labeled_max_chars
    return {
        "normalized": (
            f"Unicode {cfg.unicode_form}, newlines, tabs to {cfg.tab_size} spaces, control/format characters, "
            "trailing blanks, blank-line runs"
        ),
        "pii": f"{', '.join(cfg.pii_types)} replaced by typed placeholders" if cfg.pii else "off (pii: false)",
        "too_short": f"fewer than min_chars={cfg.min_chars} characters",
        "too_long": f"more than {'max_chars' if kind == 'corpus' else 'labeled_max_chars'}={max_chars} characters",
        "too_few_tokens": f"fewer than min_tokens={cfg.min_tokens} whitespace tokens"
        if cfg.min_tokens
        else "off (min_tokens: 0)",
        "too_many_tokens": f"more than max_tokens={cfg.max_tokens} whitespace tokens"
        if cfg.max_tokens
        else "off (max_tokens: 0)",
        "low_alpha": f"letters under min_alpha_ratio={cfg.min_alpha_ratio} of non-blank characters"
        if cfg.min_alpha_ratio
        else "off",
        "repeated_lines": (
            f"over max_repeated_line_ratio={cfg.max_repeated_line_ratio} of non-blank lines repeat an earlier one"
        )
        if cfg.max_repeated_line_ratio < 1
        else "off",
        "repeated_chars": (
            f"over max_repeated_char_ratio={cfg.max_repeated_char_ratio} of characters in runs of 10+ identical ones"
        )
        if cfg.max_repeated_char_ratio < 1
        else "off",
    }


def markdown_report(reports: list[DatasetReport]) -> str:
    """The whole cleaning report as Markdown: one table per dataset."""
    head = (
        "# Cleaning report\n\nRows removed or changed by each filter of the clean stage (params.yaml `clean:`), "
        "with up to three examples (id: text, after PII scrubbing).\n"
    )
    return head + "".join("\n" + r.markdown() for r in reports)
