"""The kg baselines, fitted on the train split only and stored as `baselines.json` in the extractor bundle.

- entities: a gazetteer of every surface string labeled in train docs, with its most frequent label, kept when
  it is labeled in at least half of its train occurrences; matched longest-first, on word boundaries.
- relations: surface patterns in the text just before and after the tail mention ("Raises X" -> raises,
  "Return a X" -> returns, "subclass of X" -> inherits, "calls X" -> calls; models/kb_features.py CUES, which the
  extractor reads as features too), else none.
- linking: the candidate in the doc's own module, else the most frequent link of the surface string in train,
  else the first candidate in id order.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.extractor import NO_RELATION
from models.kb_features import CUES, candidate_name, relation_cues
from tasks.kg.examples import Doc

BASELINES_FILE = "baselines.json"
"""The fitted baselines in the extractor bundle folder."""


@dataclass
class Baselines:
    """The fitted baselines (plain data: serialises to JSON)."""

    gazetteer: dict[str, str] = field(default_factory=dict)
    """Surface string -> entity label."""
    link_counts: dict[str, str] = field(default_factory=dict)
    """Surface string -> its most frequent train link."""
    relation_labels: list[str] = field(default_factory=list)
    """The relation labels the patterns may predict (those of the train split)."""
    _matcher: re.Pattern | None = field(default=None, init=False, repr=False, compare=False)

    def tag(self, text: str) -> list[dict]:
        """Gazetteer spans, left to right, the longest entry at each position, never overlapping."""
        if not self.gazetteer:
            return []
        if self._matcher is None:
            self._matcher = surface_matcher(self.gazetteer)
        return [
            {"start": m.start(), "end": m.end(), "label": self.gazetteer[m.group()]}
            for m in self._matcher.finditer(text)
        ]

    def relate(self, text: str, tail: tuple[int, int]) -> str:
        """The relation of the documented object to the mention at `tail`, read from the words around it."""
        for (label, _, _), cue in zip(CUES, relation_cues(text, tail)):
            if cue and label in self.relation_labels:
                return label
        return NO_RELATION

    def link(self, surface: str, module: str, candidates: list[tuple[str, str]]) -> str:
        """Entity id for a mention among `candidates` ((id, module) in id order): same module first, then the
        most frequent train link of the surface string, then the first candidate; "" when there is none."""
        if not candidates:
            return ""
        same = [cid for cid, cmod in candidates if module and cmod == module]
        if same:
            return same[0]
        frequent = self.link_counts.get(surface)
        if frequent in {cid for cid, _ in candidates}:
            return frequent
        return candidates[0][0]

    def save(self, folder: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        (Path(folder) / BASELINES_FILE).write_text(json.dumps(data, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> "Baselines":
        return cls(**json.loads((Path(folder) / BASELINES_FILE).read_text()))


def fit_baselines(train: list[Doc], relation_labels: list[str]) -> Baselines:
    """Fit every baseline on the train docs."""
    labeled: dict[str, Counter] = defaultdict(Counter)
    links: dict[str, Counter] = defaultdict(Counter)
    for doc in train:
        for m in doc.mentions:
            surface = doc.text[m.start : m.end]
            labeled[surface][m.label] += 1
            if m.link:
                links[surface][m.link] += 1
    occurrences: Counter = Counter()
    matcher = surface_matcher(labeled)
    for doc in train:
        occurrences.update(m.group() for m in matcher.finditer(doc.text))
    gazetteer = {
        surface: labels.most_common(1)[0][0]
        for surface, labels in labeled.items()
        if sum(labels.values()) * 2 >= occurrences[surface]
    }
    link_counts = {s: c.most_common(1)[0][0] for s, c in links.items()}
    return Baselines(gazetteer, link_counts, [r for r in relation_labels if r != NO_RELATION])


def surface_matcher(surfaces) -> re.Pattern:
    """One regex finding any of `surfaces` not inside a longer identifier, the longest one at each position."""
    alternatives = "|".join(re.escape(s) for s in sorted(surfaces, key=lambda s: (-len(s), s)))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def candidate_pairs(index: dict[str, list[int]], ids: list[str], modules: list[str], surface: str) -> list[tuple]:
    """(id, module) of each candidate entity of a mention's surface string, in id order."""
    return [(ids[r], modules[r]) for r in index.get(candidate_name(surface), [])]
