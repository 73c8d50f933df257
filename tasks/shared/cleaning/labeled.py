"""The labeled pass: clean texts and labels of the labeled set, held in memory (conflicting labels need a
global view); training copies come first, so a text duplicated across splits keeps its training copy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.shared.cleaning.dedup import NearDuplicates
from tasks.shared.cleaning.filters import TextCleaner
from tasks.shared.cleaning.inputs import check_input
from tasks.shared.cleaning.report import DatasetReport, filter_reasons
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def normalize_label(label: str, cfg: CleanConfig) -> str:
    """Whitespace stripped and collapsed, case folded (label_case), then renamed (label_aliases, whose keys
    are cleaned the same way). A null label becomes empty."""
    label = " ".join(("" if label is None or label != label else str(label)).split())
    label = label.lower() if cfg.label_case == "lower" else label.upper() if cfg.label_case == "upper" else label
    aliases = {" ".join(k.split()): v for k, v in cfg.label_aliases.items()}
    if cfg.label_case != "none":
        aliases = {(k.lower() if cfg.label_case == "lower" else k.upper()): v for k, v in aliases.items()}
    return aliases.get(label, label)


def clean_labeled(src: Path, dst: Path, cfg: CleanConfig) -> DatasetReport:
    """Clean the raw labeled set `src` into parquet file `dst` (not written when no row is left); the report."""
    rep = DatasetReport("labeled", filter_reasons(cfg, "labeled"))
    df = _read(src, rep)
    texts = TextCleaner(cfg, "labeled", rep).batch(df["text"].tolist(), df["id"].tolist())
    df["text"] = texts
    df = df[df["text"].notna()].reset_index(drop=True)
    df = _clean_labels(df, cfg, rep)
    df = _drop_conflicts(df, rep)
    if cfg.exact_dedup and len(df):
        df = _drop_duplicates(df, rep)
    if cfg.near_dup and len(df):
        df = _drop_near_duplicates(df, cfg, rep)
    rep.extra.setdefault("cross_split_duplicates", 0)
    rep.output_rows = len(df)
    rep.output_bytes = int(sum(len(t.encode()) for t in df["text"]))
    if len(df):
        df.to_parquet(dst, index=False)
    return rep


def _read(src: Path, rep: DatasetReport) -> pd.DataFrame:
    """The raw labeled rows with string ids, training rows first; a UserError naming the first unknown split."""
    df = check_input(src, "labeled").read().to_pandas()
    if "id" not in df.columns:
        df.insert(0, "id", [str(i) for i in range(len(df))])
    df["id"] = df["id"].astype(str)
    rep.input_rows = len(df)
    rep.input_bytes = int(sum(len(t.encode()) for t in df["text"]))
    bad_split = ~df["split"].isin(list(SPLIT_ORDER))
    if bad_split.any():
        raise UserError(
            f"{src}: row {df['id'][bad_split].iloc[0]}: split {df['split'][bad_split].iloc[0]!r} "
            f"is not one of {list(SPLIT_ORDER)}"
        )
    # train first, so that a text duplicated across splits keeps its training copy
    return df.iloc[df["split"].map(SPLIT_ORDER).argsort(kind="stable")].reset_index(drop=True)


def _clean_labels(df: pd.DataFrame, cfg: CleanConfig, rep: DatasetReport) -> pd.DataFrame:
    """Labels normalized (normalize_label); the rows whose label is then empty removed."""
    labels = df["label"].map(lambda v: normalize_label(v, cfg))
    for i in np.flatnonzero((labels != df["label"]).to_numpy()):
        rep.changed["label_normalized"] += 1
        rep.example("label_normalized", df["id"][i], df["text"][i], f"{df['label'][i]!r} -> {labels[i]!r}")
    df["label"] = labels
    empty = df["label"] == ""
    for i in np.flatnonzero(empty.to_numpy()):
        rep.remove("empty_label", df["id"][i], df["text"][i])
    return df[~empty].reset_index(drop=True)


def _drop_conflicts(df: pd.DataFrame, rep: DatasetReport) -> pd.DataFrame:
    """Every copy of a text that occurs with more than one label removed."""
    n_labels = df.groupby("text", sort=False)["label"].transform("nunique")
    conflict = n_labels > 1
    for text, g in df[conflict].groupby("text", sort=False):
        firsts = g.drop_duplicates("label")
        note = " vs ".join(f"{lab!r} ({i})" for lab, i in zip(firsts["label"], firsts["id"]))
        rep.removed["label_conflicts"] += len(g)
        rep.example("label_conflicts", g["id"].iloc[0], text, note)
    return df[~conflict].reset_index(drop=True)


def _drop_duplicates(df: pd.DataFrame, rep: DatasetReport) -> pd.DataFrame:
    """All but the first copy of each text removed, counting copies whose kept twin is in another split."""
    dup = df["text"].duplicated(keep="first")
    first = df[~dup].set_index("text")
    for i in np.flatnonzero(dup.to_numpy()):
        kept = first.loc[df["text"][i]]
        rep.remove("duplicates", df["id"][i], df["text"][i], f"copy of {kept['id']}")
        if kept["split"] != df["split"][i]:
            rep.extra["cross_split_duplicates"] += 1
    return df[~dup].reset_index(drop=True)


def _drop_near_duplicates(df: pd.DataFrame, cfg: CleanConfig, rep: DatasetReport) -> pd.DataFrame:
    """Texts with a near-twin among the earlier kept ones removed (NearDuplicates)."""
    near = NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_shingle, cfg.near_dup_num_perm)
    keep = near.keep(df["text"].tolist())
    for i in np.flatnonzero(~keep):
        twin = near.twins[i]
        rep.remove("near_duplicates", df["id"][i], df["text"][i], f"like {df['id'][twin]} ({df['split'][twin]})")
    return df[keep].reset_index(drop=True)
