"""Resumable training checkpoints: `step-XXXXXXXX/` folders holding model, optimizer, RNG and scaler state.

Written atomically with a manifest; a resume reads the newest one of the same run (fingerprint) that
verifies, and names every newer one that did not.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.checkpoint import ArtifactError, load_json, load_tensors, verify_manifest, write_manifest
from tasks.shared.engine.runtime import Runtime, unwrap
from tasks.shared.io import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")
CKPT_WEIGHTS, CKPT_TENSORS, CKPT_STATE = "model.safetensors", "train_state.safetensors", "train_state.json"


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config, data description): a checkpoint resumes only its own run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    fingerprint: str
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{pname}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pname}/{k}"] = v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state/"):
            _, rest = key.split("/", 1)
            pname, k = rest.rsplit("/", 1)
            state.setdefault(pname, {})[k] = t
    for key, v in meta["scalars"].items():
        pname, k = key.rsplit("/", 1)
        state.setdefault(pname, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    state: TrainState,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rt: Runtime,
    gen: torch.Generator,
    keep: int = 2,
) -> Path | None:
    """Write `folder/step-XXXXXXXX/` atomically (model, optimizer, RNG, scaler, state, manifest); keep
    the newest `keep`.

    Collective under FSDP (every rank must call it); only rank 0 writes.
    """
    from safetensors.torch import save_file

    msd, osd = _full_state(model, opt)
    if not rt.is_main:
        return None
    seen: dict[int, str] = {}
    weights = {}
    for k, v in msd.items():  # tied weights: store each storage once
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        weights[k] = v.detach().cpu().contiguous()
    tensors, opt_meta = _flatten_optimizer(osd)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/data"] = gen.get_state()
    if rt.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(rt.device)
    meta = {
        "step": state.step,
        "fingerprint": state.fingerprint,
        "history": state.history,
        "extra": state.extra,
        "optimizer": opt_meta,
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "world": rt.world,
    }

    target = Path(folder) / f"step-{state.step:08d}"
    with atomic_dir(target) as d:
        save_file(weights, str(d / CKPT_WEIGHTS))
        save_file(tensors, str(d / CKPT_TENSORS))
        (d / CKPT_STATE).write_text(json.dumps(meta))
        write_manifest(d)  # resume checks every file against it
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clear_checkpoints(folder: Path, rt: Runtime) -> int:
    """Remove every checkpoint in `folder` (a run starting afresh); returns how many. Collective: every
    rank has finished looking for one to resume before rank 0 deletes."""
    if rt.distributed:
        torch.distributed.barrier()
    found = checkpoints(folder)
    if rt.is_main:
        for old in found:
            shutil.rmtree(old, ignore_errors=True)
    return len(found)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (a half-written one is never named step-*)."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and STEP_DIR.match(p.name))


@dataclass
class Checkpoint:
    """A checkpoint read from disk and verified, not yet applied to a model."""

    path: Path
    meta: dict
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.meta["step"]


def read_checkpoint(path: Path) -> Checkpoint:
    """Check a checkpoint folder against its manifest (older ones have none) and read it into memory.

    Raises:
        ArtifactError: naming the file that is missing, truncated, corrupt or incomplete.
    """
    path = Path(path)
    verify_manifest(path)
    meta = load_json(path / CKPT_STATE, ("step", "fingerprint", "history", "optimizer"))
    if not isinstance(meta["step"], int) or not {"param_groups", "scalars"} <= set(meta["optimizer"] or {}):
        raise ArtifactError(path / CKPT_STATE, "step or optimizer entry is malformed")
    weights, tensors = load_tensors(path / CKPT_WEIGHTS), load_tensors(path / CKPT_TENSORS)
    if "rng/data" not in tensors:
        raise ArtifactError(path / CKPT_TENSORS, "no data RNG state")
    return Checkpoint(path, meta, weights, tensors)


def latest_checkpoint(folder: Path, fp: str) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint of run `fp` in `folder` that reads back intact, and the newer ones that did
    not, each with what is wrong (`model.safetensors: corrupt (sha256 mismatch)`)."""
    unusable = []
    for p in reversed(checkpoints(folder)):
        try:
            if load_json(p / CKPT_STATE).get("fingerprint") != fp:
                continue  # another run's checkpoint
            return read_checkpoint(p), unusable
        except ArtifactError as e:
            unusable.append((p, f"{e.file.relative_to(p) if e.file.is_relative_to(p) else e.file}: {e.problem}"))
    return None, unusable


def restore_checkpoint(
    ck: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, gen: torch.Generator
) -> TrainState:
    """Restore model, optimizer, scaler and RNG state in place from a read checkpoint; returns its TrainState."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    meta, weights, tensors = ck.meta, dict(ck.weights), ck.tensors
    inner = unwrap(model)
    named = inner.state_dict(keep_vars=True)
    for name, p in named.items():  # tied weights were stored once
        if name not in weights:
            for o, q in named.items():
                if o in weights and q is p:
                    weights[name] = weights[o]
    set_state_dict(
        inner,
        opt,
        model_state_dict=weights,
        optim_state_dict=_unflatten_optimizer(tensors, meta["optimizer"]),
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
    )
    if meta.get("scaler") and rt.scaler is not None:
        rt.scaler.load_state_dict(meta["scaler"])
    gen.set_state(tensors["rng/data"])
    if rt.is_main and meta.get("world", 1) == rt.world:
        torch.set_rng_state(tensors["rng/torch"])
        if rt.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], rt.device)
    else:  # other ranks: a fresh stream that still depends only on (seed, rank, step)
        torch.manual_seed(hash((meta["step"], rt.rank)) & 0xFFFFFFFF)
    return TrainState(
        step=meta["step"], fingerprint=meta["fingerprint"], history=meta["history"], extra=meta.get("extra", {})
    )


def load_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, gen: torch.Generator
) -> TrainState:
    """Read, verify and restore the checkpoint at `path` (see `read_checkpoint`, `restore_checkpoint`)."""
    return restore_checkpoint(read_checkpoint(path), model, opt, rt, gen)
