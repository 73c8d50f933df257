"""lmforge replaces only outputs it wrote: a stage refuses to overwrite anything else.

A stage's outputs are the `outs`, `metrics` and `plots` files its dvc.yaml (the default pipeline's, or the
learning curve's curve/dvc.yaml) declares for it, resolved from params.yaml's `paths:`. One that already
exists may be replaced only if lmforge owns it: DVC recorded it as an output in a lock file, lmforge
recorded it after writing it (`.dvc/tmp/lmforge-outputs.json`), or it is an empty folder. Anything else —
a folder of your own that an output path now points at — is refused with one line naming the params key.
dvc.yaml marks outputs `persist: true` so that DVC does not delete them before the stage can look (DVC's
default is to remove a stage's outputs before running it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tasks.shared.errors import UserError

LEDGER = Path(".dvc") / "tmp" / "lmforge-outputs.json"
DEFAULT_PIPELINE = Path("dvc.yaml")
"""The pipeline `dvc repro` and `make pipeline` run, and the only one the staleness checks look at."""
PIPELINES = (DEFAULT_PIPELINE, Path("curve") / "dvc.yaml")
"""Every pipeline file: the default one and the learning curve's, which runs only when asked (`make curve`). The
curve's stage runs in the project root (`wdir: ..`), so its paths read as the default pipeline's; each file's
lock lies beside it."""
_PATH_REF = re.compile(r"\$\{paths\.(\w+)\}")


def declared_outputs(stage: str, paths, root: Path = Path(".")) -> dict[Path, str]:
    """The outputs dvc.yaml declares for `stage`, resolved: path -> the params key it comes from."""
    body = next((s[stage] for s in _stages(root, PIPELINES) if stage in s), {})
    out: dict[Path, str] = {}
    for kind in ("outs", "metrics", "plots"):
        for item in body.get(kind) or []:
            template = next(iter(item)) if isinstance(item, dict) else str(item)
            keys = _PATH_REF.findall(template)
            resolved = _PATH_REF.sub(lambda m: str(getattr(paths, m.group(1))), template)
            out[Path(resolved)] = f"paths.{keys[0]}" if keys else template
    return out


def _stages(root: Path, files) -> list[dict]:
    """The `stages:` mapping of each of `files` (dvc.yaml or dvc.lock files) that exists and parses."""
    found = []
    for f in files:
        f = Path(root) / f
        try:
            found.append((yaml.safe_load(f.read_text()) or {}).get("stages") or {})
        except (FileNotFoundError, yaml.YAMLError):
            continue
    return found


def _norm(p: Path | str) -> str:
    return Path(p).as_posix().rstrip("/")


def owned(root: Path = Path(".")) -> set[str]:
    """Paths lmforge may replace: outputs in the pipelines' locks (dvc.lock, curve/dvc.lock) and in the ledger."""
    found: set[str] = set()
    for stages in _stages(root, [f.with_suffix(".lock") for f in PIPELINES]):
        found |= {_norm(o["path"]) for body in stages.values() for o in (body.get("outs") or []) if "path" in o}
    ledger = Path(root) / LEDGER
    if ledger.exists():
        try:
            found |= set(json.loads(ledger.read_text()))
        except ValueError:
            pass
    return found


def check_replaceable(stage: str, paths, root: Path = Path(".")) -> None:
    """Refuse (UserError naming the params key) if an output of `stage` exists and lmforge does not own it."""
    if not (Path(root) / ".dvc").is_dir():  # not a DVC project (a library call): nothing to compare with
        return
    mine = None
    for path, key in declared_outputs(stage, paths, root).items():
        full = Path(root) / path
        if not full.exists() and not full.is_symlink():
            continue
        if full.is_dir() and not any(full.iterdir()):
            continue
        mine = owned(root) if mine is None else mine
        if _norm(path) not in mine:
            kind = "folder" if full.is_dir() else "file"
            raise UserError(
                f"params.yaml: {key}: {path} is an existing {kind} that lmforge did not write; refusing to replace it "
                f"(point {key} elsewhere, or move it away)"
            )


def record(stage: str, paths, root: Path = Path(".")) -> None:
    """Remember the outputs `stage` just wrote, so a later run may replace them."""
    from tasks.shared.io import write_json

    if not (Path(root) / ".dvc").is_dir():
        return
    ledger = Path(root) / LEDGER
    try:
        known = set(json.loads(ledger.read_text())) if ledger.exists() else set()
    except ValueError:
        known = set()
    new = known | {_norm(p) for p in declared_outputs(stage, paths, root)}
    if new != known:
        write_json(ledger, sorted(new))
