"""Content hashes of saved files, importable without torch: one implementation for the manifests of
bundles and checkpoints (models/checkpoint.py) and the artifact hashes of evaluation and promotion
(tasks/shared/digest.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
