"""The per-text steps of cleaning: normalize, the length filters, PII scrubbing, the quality filters."""

from __future__ import annotations

from tasks.shared.cleaning.pii import PLACEHOLDERS, scrub_pii, scrub_texts
from tasks.shared.cleaning.quality import char_bound, char_stats, repeated_char_ratio, repeated_line_ratio
from tasks.shared.cleaning.report import SNIPPET, DatasetReport
from tasks.shared.config.clean import CleanConfig
from tasks.shared.text import normalize_text


class TextCleaner:
    """The per-text steps: normalize, the length filters, PII scrubbing, the quality filters.

    Length comes before scrubbing so that texts about to be dropped (the longest ones, often) are not
    scrubbed; an example from a dropped text is scrubbed on its own, so no report shows PII. PII counts
    cover the texts that pass the length filters. Each step runs over a whole batch (the PII and quality
    steps look at all its texts at once); the report is then written row by row, as if each text had gone
    through all the steps before the next one.
    """

    def __init__(self, cfg: CleanConfig, kind: str, report: DatasetReport):
        self.cfg, self.report = cfg, report
        self.max_chars = cfg.max_chars if kind == "corpus" else cfg.labeled_max_chars

    def _shown(self, text: str) -> str:
        """What an example may show of `text`: its start, scrubbed (long enough to hold any whole PII item
        that reaches into the snippet)."""
        return scrub_pii(text[: SNIPPET * 5], self.cfg.pii_types)[0] if self.cfg.pii else text

    def __call__(self, text: str, row_id) -> str | None:
        """The cleaned text, or None (counted in the report) if a filter removes it."""
        return self.batch([text], [row_id])[0]

    def batch(self, texts: list, ids: list) -> list[str | None]:
        """The cleaned texts, None for each one a filter removes (counted in the report, in row order)."""
        cfg, rep = self.cfg, self.report
        raw = [t or "" for t in texts]  # a null text is an empty one: too short
        normal = [normalize_text(t, cfg.unicode_form, cfg.tab_size) for t in raw]
        length = [self.length_reason(t) for t in normal]
        passed = [i for i, r in enumerate(length) if r is None]
        scrubbed = (
            scrub_texts([normal[i] for i in passed], cfg.pii_types) if cfg.pii else [(normal[i], None) for i in passed]
        )
        quality = dict(zip(passed, self.quality_reasons([t for t, _ in scrubbed])))
        scrubbed = dict(zip(passed, scrubbed))
        out: list[str | None] = [None] * len(raw)
        for i, row_id in enumerate(ids):
            new = normal[i]
            if new != raw[i]:
                rep.changed["normalized"] += 1
                if rep.wants("normalized"):
                    rep.example("normalized", row_id, self._shown(new))
            reason = length[i]
            if reason is None:
                new, found = scrubbed[i]
                if found is not None and any(found.values()):
                    rep.pii.update(found)
                    rep.changed["pii"] += 1
                    if rep.wants("pii"):
                        at = min(i for i in (new.find(PLACEHOLDERS[k]) for k, n in found.items() if n) if i >= 0)
                        shown = ("…" if at > 20 else "") + new[max(0, at - 20) :]
                        rep.example("pii", row_id, shown, ", ".join(f"{n} {k}" for k, n in found.items() if n))
                reason = quality[i]
                if reason is None:
                    out[i] = new
                    continue
            rep.removed[reason[0]] += 1
            if rep.wants(reason[0]):
                rep.example(reason[0], row_id, self._shown(new), reason[1])
        return out

    def length_reason(self, text: str) -> tuple[str, str] | None:
        """The length filter (characters, whitespace tokens) that removes `text` and its length, or None."""
        cfg = self.cfg
        n = len(text)
        if n < cfg.min_chars:
            return "too_short", f"{n} chars"
        if n > self.max_chars:
            return "too_long", f"{n} chars"
        if cfg.min_tokens and (k := len(text.split(None, cfg.min_tokens))) < cfg.min_tokens:  # stops after min_tokens
            return "too_few_tokens", f"{k} tokens"
        if cfg.max_tokens and (k := len(text.split())) > cfg.max_tokens:
            return "too_many_tokens", f"{k} tokens"
        return None

    def quality_reason(self, text: str) -> tuple[str, str] | None:
        """The quality filter that removes `text` and its ratio, or None."""
        return self.quality_reasons([text])[0]

    def quality_reasons(self, texts: list[str]) -> list[tuple[str, str] | None]:
        """quality_reason of each of `texts` (their characters counted all at once: char_stats)."""
        cfg = self.cfg
        counted = cfg.min_alpha_ratio > 0 or cfg.max_repeated_char_ratio < 1
        letters, nonspace, equal = char_stats(texts) if counted else ([0] * len(texts),) * 3
        out: list[tuple[str, str] | None] = []
        for text, n_letters, n_nonspace, n_equal in zip(texts, letters, nonspace, equal):
            reason = None
            if cfg.min_alpha_ratio > 0 and (r := n_letters / n_nonspace if n_nonspace else 0.0) < cfg.min_alpha_ratio:
                reason = "low_alpha", f"{r:.2f} letters"
            elif cfg.max_repeated_line_ratio < 1 and (r := repeated_line_ratio(text)) > cfg.max_repeated_line_ratio:
                reason = "repeated_lines", f"{r:.2f} of lines"
            elif (
                cfg.max_repeated_char_ratio < 1
                and char_bound(n_equal, len(text)) > cfg.max_repeated_char_ratio
                and (r := repeated_char_ratio(text)) > cfg.max_repeated_char_ratio
            ):
                reason = "repeated_chars", f"{r:.2f} of characters"
            out.append(reason)
        return out
