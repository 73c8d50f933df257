"""The kg task data as the extractor trains and is scored on it: one `Doc` per text, with its gold mentions and
candidate relation pairs, read from the flat tables of `paths.kg_data` (KG-SPEC "Task data")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.kg.records import TABLES
from tasks.shared.io import read_parquet


def read_task_table(folder: Path | str, name: str) -> pd.DataFrame:
    """Table `name` of the task data in `folder` (records.TABLES' columns); a missing or broken one is a UserError
    naming it."""
    return read_parquet(Path(folder) / f"{name}.parquet", TABLES[name])


@dataclass
class Mention:
    start: int
    end: int
    label: str
    link: str


@dataclass
class Doc:
    """One text with its gold mentions (in `m` order) and gold relation pairs (head -1 = the doc's owner)."""

    id: str
    text: str
    module: str
    split: str
    mentions: list[Mention] = field(default_factory=list)
    pairs: list[tuple[int, int, str]] = field(default_factory=list)
    """(head, tail, label): mention indices, head -1 for the documented object."""
    owner: str = ""
    """Entity id of the documented object ("" for user data)."""


@dataclass
class TaskData:
    entities: pd.DataFrame
    docs: list[Doc]

    def split(self, name: str) -> list[Doc]:
        return [d for d in self.docs if d.split == name]

    @property
    def entity_labels(self) -> list[str]:
        """Entity labels of the train split, sorted."""
        return sorted({m.label for d in self.split("train") for m in d.mentions})

    @property
    def relation_labels(self) -> list[str]:
        """`none` first, then the other relation labels of the train split, sorted."""
        found = {label for d in self.split("train") for *_, label in d.pairs}
        return ["none", *sorted(found - {"none"})]

    @property
    def relation_heads(self) -> str:
        """ "span" when a train pair's head is a mention (user span data), else "subject" (head -1, the stdlib)."""
        return "span" if any(h >= 0 for d in self.split("train") for h, _, _ in d.pairs) else "subject"


def load_task_data(folder: Path) -> TaskData:
    """The docs of `folder` with their mentions and relation pairs attached."""
    t = {name: read_task_table(folder, name) for name in ("entities", "docs", "mentions", "relations")}
    docs = {r.id: Doc(r.id, r.text, r.module, r.split, owner=r.owner) for r in t["docs"].itertuples(index=False)}
    for r in t["mentions"].sort_values(["doc_id", "m"]).itertuples(index=False):
        docs[r.doc_id].mentions.append(Mention(int(r.start), int(r.end), str(r.label), str(r.link)))
    for r in t["relations"].itertuples(index=False):
        docs[r.doc_id].pairs.append((int(r.head), int(r.tail), str(r.label)))
    return TaskData(t["entities"], list(docs.values()))
