"""Content hashes of stage artifacts: what evaluation scored is what promotion registers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from models.files import file_sha256
from tasks.shared.errors import UserError


def tree_sha256(path: Path | str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise UserError(f"{path}: not found (run the stage that produces it first: `dvc repro`)")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
