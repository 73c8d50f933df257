"""The corpus pass: stream a raw corpus parquet file in bounded batches, clean, deduplicate and write it.

Memory stays flat as the corpus grows: the only state that grows is 8 bytes per kept text for exact dedup and
8 per LSH band for near-dup. With workers, the per-text work of a batch runs in a pool (`workers`) while this
process reads, deduplicates and writes, batch by batch in order.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.shared.cleaning.dedup import HashIndex, NearDuplicates, first_copies
from tasks.shared.cleaning.inputs import check_input, row_ids
from tasks.shared.cleaning.report import DatasetReport, filter_reasons
from tasks.shared.cleaning.workers import PART_BYTES, CleanedPart, CorpusWork, open_pool, work
from tasks.shared.config.clean import CleanConfig
from tasks.shared.io import parquet_batches

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_BYTES = 16 << 20
"""A corpus batch holds at most about this much text, whatever batch_rows says."""


@dataclass(frozen=True)
class Layout:
    """How a corpus file is read (batch and part sizes) and written (its schema)."""

    rows: int
    """Rows per batch: batch_rows, or fewer to hold about BATCH_BYTES of text."""
    part_rows: int
    """Rows per part handed to a worker: about PART_BYTES of text."""
    text_bytes: int
    """The file's uncompressed text, from its metadata."""
    schema: pa.Schema
    """The output's: the input's, with `id` as a string column (first, when the input has none)."""


def layout(pf, cfg: CleanConfig) -> Layout:
    """The Layout of the corpus file `pf` (a pyarrow ParquetFile) cleaned with `cfg`."""
    import pyarrow as pa

    meta = pf.metadata
    col = pf.schema_arrow.get_field_index("text")
    text_bytes = sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
    per_mb = max(1, meta.num_rows) / max(1, text_bytes)
    rows = max(1, min(cfg.batch_rows, int(BATCH_BYTES * per_mb)))
    part_rows = max(1, min(rows, int(PART_BYTES * per_mb)))
    schema = pf.schema_arrow.remove_metadata()
    if "id" in schema.names:
        schema = schema.set(schema.get_field_index("id"), pa.field("id", pa.string()))
    else:
        schema = schema.insert(0, pa.field("id", pa.string()))
    return Layout(rows, part_rows, text_bytes, schema)


class CorpusWriter:
    """Takes the cleaned batches in order: removes exact and near-duplicates, writes what stays, counts it."""

    def __init__(self, cfg: CleanConfig, rep: DatasetReport, writer, schema: pa.Schema, bar):
        self.rep, self.writer, self.schema, self.bar = rep, writer, schema, bar
        self.exact = HashIndex() if cfg.exact_dedup else None
        self.near = (
            NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_shingle, cfg.near_dup_num_perm)
            if cfg.near_dup
            else None
        )

    def finish(self, table: pa.Table, ids: list, nbytes: int, parts: list) -> None:
        """Deduplicate and write one batch (`table`), given its cleaned `parts` (CleanedParts or pool results)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        got = CorpusWork.join([p if isinstance(p, CleanedPart) else p.get() for p in parts])
        rep = self.rep
        rep.merge(got.report)
        keep = self.dedup(got, [ids[i] for i in got.kept])
        if keep.any():
            rows_kept = pa.array(got.kept[keep], pa.int64())
            texts = got.texts.filter(pa.array(keep))
            out = (
                table.drop_columns(["text"])
                .take(rows_kept)
                .add_column(table.schema.get_field_index("text"), "text", texts)
            )
            if "id" not in out.column_names:
                out = out.add_column(0, "id", pa.array([ids[i] for i in got.kept[keep]], pa.string()))
            self.writer.write_table(out.cast(self.schema))
            rep.output_rows += len(texts)
            rep.output_bytes += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
        self.bar.update(nbytes)

    def dedup(self, got: CleanedPart, ids: list) -> np.ndarray:
        """Exact then near-duplicate removal of the texts of one batch the filters kept; which of them stay."""
        rep = self.rep
        keep = np.ones(len(got.kept), bool)

        def remove(key: str, j: int, note: str = "") -> None:
            rep.removed[key] += 1
            if rep.wants(key):
                rep.example(key, ids[j], got.texts[j].as_py(), note)

        if self.exact is not None and keep.any():
            keep = first_copies(got.digests, self.exact)
            for j in np.flatnonzero(~keep):
                remove("duplicates", j)
        if self.near is not None and keep.any():
            left = np.flatnonzero(keep)
            mask = self.near.keep_keys(got.keys[left], got.words[left])
            for j in np.flatnonzero(~mask):
                twin = self.near.twins.get(j)
                remove("near_duplicates", left[j], f"like {ids[left[twin]]}" if twin is not None else "")
            keep[left[~mask]] = False
        return keep


def read_batch(batch: pa.RecordBatch, rep: DatasetReport) -> tuple[pa.Table, list, list, int]:
    """(table, row ids, texts, text bytes) of one raw batch, counted into `rep`'s input."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.Table.from_batches([batch])
    ids = row_ids(table, rep.input_rows)
    raw = table.column("text").to_pylist()
    nbytes = int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)
    rep.input_rows += len(raw)
    rep.input_bytes += nbytes
    return table, ids, raw, nbytes


def clean_corpus(src: Path, dst: Path, cfg: CleanConfig, progress: bool) -> DatasetReport:
    """Clean the raw corpus `src` into parquet file `dst`, streamed; returns the report."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    pf = check_input(src, "corpus")
    rep = DatasetReport("corpus", filter_reasons(cfg, "corpus"))
    plan = layout(pf, cfg)
    text_type = plan.schema.field("text").type
    in_process = CorpusWork(cfg, text_type)
    bar = tqdm(
        total=plan.text_bytes,
        desc="clean corpus",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    small = [n for n in plan.schema.names if n not in ("id", "text")]  # dictionary or min/max of texts: wasted work
    pool = open_pool(cfg, text_type, -(-pf.metadata.num_rows // plan.part_rows), plan.text_bytes)
    pending: deque = deque()  # batches handed to the pool: at most two, so memory stays flat
    try:
        with bar, pq.ParquetWriter(dst, plan.schema, use_dictionary=small, write_statistics=small) as writer:
            out = CorpusWriter(cfg, rep, writer, plan.schema, bar)
            for batch in parquet_batches(pf, plan.rows):
                table, ids, raw, nbytes = read_batch(batch, rep)
                if pool is None:
                    out.finish(table, ids, nbytes, [in_process(raw, ids)])
                    continue
                parts = [
                    pool.apply_async(work, (raw[a : a + plan.part_rows], ids[a : a + plan.part_rows], a))
                    for a in range(0, len(raw), plan.part_rows)
                ]
                pending.append((table, ids, nbytes, parts))
                if len(pending) > 1:
                    out.finish(*pending.popleft())
            while pending:
                out.finish(*pending.popleft())
            bar.total = bar.n  # the total came from the file's (uncompressed) metadata
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C or an error: no worker outlives the pass
    return rep
