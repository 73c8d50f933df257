"""Held-out splits by whole group (source file): the one assignment every task's data uses.

Classification (ingest) and the knowledge-graph task (kg_data) both split by source file with the same
seed and fractions (`ingest.seed`, `ingest.val_fraction`, `ingest.test_fraction`), so no file's text
is in two splits and a file keeps its split across tasks.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from tasks.shared.config.ingest import IngestConfig

SPLITS = ("train", "val", "test")
OVERSHOOT = 1.5
"""A group goes to a held-out split only if that split stays within OVERSHOOT x its quota for the label."""


def seeded_hash(seed: int, key: str) -> str:
    """A seeded, stable order key for `key` (sha1 hex of `<seed>:<key>`)."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(groups: pd.DataFrame, cfg: IngestConfig) -> dict[str, str]:
    """Map each group (source file) to a split so each label gets ~val/test_fraction of its rows.

    `groups` has columns group, label, n. Groups are visited in seeded hash order: test fills first,
    then val, the rest is train (always at least the last group). A group that would take a split past
    OVERSHOOT x its quota stays in train, so one big file cannot become most of a label's test rows; a
    held-out split that no group fits gets the label's smallest train group (while train keeps one).
    """
    out: dict[str, str] = {}
    for _, g in groups.groupby("label", sort=True):
        g = g.assign(h=[seeded_hash(cfg.seed, str(k)) for k in g["group"]]).sort_values("h")
        total = g["n"].sum()
        quota = {"test": cfg.test_fraction * total, "val": cfg.val_fraction * total}
        filled = {"test": 0, "val": 0}
        for i, (key, n) in enumerate(zip(g["group"], g["n"])):
            last = i == len(g) - 1
            fits = [
                s
                for s in ("test", "val")
                if not last and filled[s] < quota[s] and filled[s] + n <= OVERSHOOT * quota[s]
            ]
            out[key] = fits[0] if fits else "train"
            if fits:
                filled[fits[0]] += n
        for split in ("test", "val"):
            train = g[g["group"].map(out) == "train"].sort_values(["n", "h"])
            if not filled[split] and quota[split] > 0 and len(train) > 1:
                out[train["group"].iloc[0]] = split
    return out
