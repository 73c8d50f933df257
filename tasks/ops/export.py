"""`lmforge export VERSION --format hf|onnx --out DIR`: a registered or local model in formats other tools load.

VERSION is a registry version number of `tracking.registered_model` (`3` or `v3`), an alias (`champion`), a local
bundle folder (tokenizer.json, classifier/, lm/: what the registry holds) or a classifier folder of this workspace
(it is exported with the workspace's tokenizer, `paths.tokenizer`, and LM, `paths.lm`).

- `hf`: `DIR/classifier` and `DIR/lm` as Hugging Face GPT-2 folders (models/hf.py `export_hf`: what maps to what,
  and what has no GPT-2 form);
- `onnx`: the graphs ONNX Runtime runs (models/onnx_export.py `export_onnx`).

DIR must be new or empty (an existing non-empty folder is refused, as stage outputs are); it is written in a temp
folder beside it and renamed into place when complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from models.bundle import write_bundle
from models.errors import ArtifactError
from models.tokenizer import TOKENIZER_FILE
from tasks.shared.config.params import Params
from tasks.shared.errors import UserError
from tasks.shared.io import atomic_dir

FORMATS = ("hf", "onnx")


def _local_bundle(folder: Path, params: Params, tmp: Path) -> Path:
    """`folder` if it is a bundle; a classifier folder bundled with the workspace's tokenizer and LM."""
    if (folder / TOKENIZER_FILE).is_file() and (folder / "classifier").is_dir():
        return folder
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: neither a bundle folder (tokenizer.json, classifier/) nor a model folder")
    tokenizer = Path(params.paths.tokenizer) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: missing (a classifier folder is exported with the workspace's tokenizer)")
    lm = Path(params.paths.lm)
    write_bundle(tmp / "bundle", tokenizer, folder, lm if (lm / "config.json").is_file() else None)
    return tmp / "bundle"


def source_bundle(version: str, params: Params, tmp: Path) -> Path:
    """The bundle folder VERSION names (see the module docstring), downloaded under `tmp` when registered."""
    if Path(version).is_dir():
        return _local_bundle(Path(version), params, tmp)
    from deploy.resolve import ModelUnavailable, download_bundle

    name = params.tracking.registered_model
    number = version.removeprefix("v")
    uri = f"models:/{name}/{number}" if number.isdigit() else f"models:/{name}@{version}"
    try:
        return download_bundle(uri, tmp)
    except ModelUnavailable as e:
        raise UserError(str(e)) from None


def check_out(out: Path) -> None:
    """Refuse an `out` that exists and is not an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not empty; refusing to replace it (choose a new folder)")


def run(version: str, fmt: str, out: Path | str, params: Params) -> list[Path]:
    """Export VERSION in format `fmt` into folder `out`; the files written, relative to `out`."""
    out = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    check_out(out)
    with tempfile.TemporaryDirectory(prefix="lmforge-export-") as tmp:
        bundle = source_bundle(version, params, Path(tmp))
        try:
            with atomic_dir(out) as d:
                if fmt == "hf":
                    from models.hf import export_hf

                    export_hf(bundle, d)
                else:
                    from models.onnx_export import export_onnx  # helper "inference"'s module (torch, onnx)

                    export_onnx(bundle, d)
        except ArtifactError as e:  # named inside VERSION, not inside the temp folder it was read from
            file = e.file.relative_to(bundle) if e.file.is_relative_to(bundle) else e.file
            raise UserError(f"{version}: {file.as_posix()}: {e.problem}") from None
        except TypeError as e:  # export_onnx: an int8 (PyTorch) or CNN/GRU classifier has no ONNX export
            raise UserError(f"{version}: classifier/config.json: {e} (export its float source instead)") from None
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
