"""The token-shard layout that tokenize writes and the training stages read.

A tokens folder holds flat little-endian uint16 id files `<split>-00000.bin`, `<split>-00001.bin`, ...
(a single `<split>.bin` also reads) for the splits `train` and `val`, and `meta.json` describing them
(vocabulary size, special-token ids, token counts, shard names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.shared.errors import UserError

META_FILE = "meta.json"
DTYPE = np.uint16


def shard_files(folder: Path | str, split: str) -> list[Path]:
    """The token shards of `split` in order."""
    return sorted(Path(folder).glob(f"{split}-*.bin")) or [Path(folder) / f"{split}.bin"]


def write_shards(ids: np.ndarray, folder: Path | str, split: str, shard_tokens: int) -> list[str]:
    """Write `ids` as `<split>-00000.bin`, ... of at most `shard_tokens` ids each; returns the names."""
    names = []
    for i, s in enumerate(range(0, max(1, ids.size), shard_tokens)):
        name = f"{split}-{i:05d}.bin"
        ids[s : s + shard_tokens].astype(DTYPE, copy=False).tofile(Path(folder) / name)
        names.append(name)
    return names


def open_shards(folder: Path | str, split: str) -> list[np.memmap]:
    """Memory maps of every shard of `split`; a missing shard is a UserError naming it."""
    files = shard_files(folder, split)
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"{missing[0]}: token shard not found (run the tokenize stage first)")
    return [np.memmap(f, dtype=DTYPE, mode="r") for f in files]


def load_tokens(folder: Path | str, split: str) -> np.ndarray:
    """All token ids of `split`, shards joined (memory-mapped when there is one)."""
    maps = open_shards(folder, split)
    return maps[0] if len(maps) == 1 else np.concatenate(maps)


def read_meta(folder: Path | str) -> dict:
    """`meta.json` of a tokens folder."""
    f = Path(folder) / META_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"{f}: not found (run the tokenize stage first)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None
