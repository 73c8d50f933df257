"""The pretrain stage as users start it (`python -m tasks.pretrain`): resume after SIGKILL, 2-process DDP.

Runs on the tiny synthetic project, CPU only, deterministic mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import LABELS, ROOT, TINY_CLEAN, TINY_TOKENIZE, TINY_VALIDATE, _project, write_raw
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

PRETRAIN = {
    "model": {"preset": "tiny"},
    "batch_size": 16,
    "max_steps": 160,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 10,
    "eval_interval": 60,
    "eval_batches": 2,
    "log_interval": 1,
    "checkpoint_interval": 40,
    "deterministic": True,
    "precision": "fp32",  # resumed and uninterrupted runs are compared bit for bit: no timed choice
    "seed": 1337,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tokenized tiny project and a params file pointing into it."""
    from tasks import clean, tokenize, validate

    root = tmp_path_factory.mktemp("training")
    paths = _project(root)
    write_raw(paths)
    clean.run(TINY_CLEAN, paths)
    validate.run(TINY_VALIDATE, TINY_CLEAN, LABELS, True, paths)
    tokenize.run(TINY_TOKENIZE, paths)
    return root


def write_params(root: Path, name: str, **pretrain) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {k: str(root / v) for k, v in params["paths"].items()}
    params["tracking"].update(uri=f"sqlite:///{root}/mlflow.db", artifacts=str(root / "mlartifacts"))
    params["pretrain"] = {**PRETRAIN, **pretrain}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage(params: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LMFORGE_PARENT_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.pretrain", "--params", str(params)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return out


def outputs(root: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    lm = root / "data" / "models" / "lm"
    metrics = json.loads((root / "metrics" / "pretrain.json").read_text())
    return json.loads((lm / "history.json").read_text()), load_file(str(lm / "model.safetensors")), metrics


def reset(root: Path) -> None:
    import shutil

    for d in ("data/models/lm", "data/checkpoints", "metrics"):
        shutil.rmtree(root / d, ignore_errors=True)


def test_sigkill_then_resume_continues_the_same_loss_curve_bit_exactly(project):
    params = write_params(project, "resume")
    reset(project)
    finish(stage(params, project))
    reference_history, reference_weights, m = outputs(project)
    assert m["resumed_from_step"] == 0

    reset(project)
    proc = stage(params, project)
    first = project / "data" / "checkpoints" / "pretrain" / "step-00000080"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (project / "data" / "models" / "lm").exists()  # nothing that looks like a finished model

    out = finish(stage(params, project))
    history, weights, m = outputs(project)
    assert 80 <= m["resumed_from_step"] < PRETRAIN["max_steps"], out[-2000:]
    assert "resuming from" in out
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in h]  # noqa: E731
    assert strip(history) == strip(reference_history)  # the same curve, float for float
    assert weights.keys() == reference_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], reference_weights[k]), k


def losses(root: Path) -> dict[str, torch.Tensor]:
    history, _, _ = outputs(root)
    return {
        "train": torch.tensor([h["train_loss"] for h in history if "train_loss" in h]),
        "val": torch.tensor([h["val_loss"] for h in history if "val_loss" in h]),
    }


def short_run(root: Path, name: str, nproc: int, strategy: str) -> str:
    """30 steps at batch 16 in `nproc` processes (gloo)."""
    reset(root)
    dist = {"nproc": nproc, "backend": "gloo", "strategy": strategy}
    return finish(stage(write_params(root, name, max_steps=30, checkpoint_interval=15, distributed=dist), root))


@pytest.fixture(scope="module")
def one_process(project) -> dict[str, torch.Tensor]:
    """The losses of the 30-step run in one process: the same for every strategy (one process wraps nothing)."""
    short_run(project, "one", 1, "ddp")
    return losses(project)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_at_the_same_global_batch(project, one_process, strategy):
    """gloo on CPU; FSDP shards parameters, gradients and optimizer state across the two ranks."""
    out = short_run(project, f"{strategy}2", 2, strategy)
    two = losses(project)
    assert out.count("step 0: val loss") == 1  # only rank 0 reports
    assert outputs(project)[2]["device"].endswith("1 threads)")  # torchrun workers share the cores
    assert len(one_process["train"]) == len(two["train"]) == 30
    torch.testing.assert_close(two["train"], one_process["train"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["val"], one_process["val"], rtol=1e-4, atol=1e-5)
    assert two["train"][-1] < two["train"][0] - 0.3  # and it learned
