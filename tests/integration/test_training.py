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
    "max_steps": 240,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 10,
    "eval_interval": 60,
    "eval_batches": 2,
    "log_interval": 1,
    "checkpoint_interval": 40,
    "deterministic": True,
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_at_the_same_global_batch(project, strategy):
    """gloo on CPU; FSDP shards parameters, gradients and optimizer state across the two ranks."""
    losses = {}
    for n in (1, 2):
        reset(project)
        dist = {"nproc": n, "backend": "gloo", "strategy": strategy}
        params = write_params(project, f"{strategy}{n}", max_steps=30, checkpoint_interval=15, distributed=dist)
        out = finish(stage(params, project))
        history, _, m = outputs(project)
        losses[n] = torch.tensor([h["train_loss"] for h in history if "train_loss" in h])
        val = [h["val_loss"] for h in history if "val_loss" in h]
        losses[f"val{n}"] = torch.tensor(val)
        if n == 2:
            assert out.count("step 0: val loss") == 1  # only rank 0 reports
            assert m["device"].endswith("1 threads)")  # torchrun workers share the cores
    assert len(losses[1]) == len(losses[2]) == 30
    torch.testing.assert_close(losses[2], losses[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["val2"], losses["val1"], rtol=1e-4, atol=1e-5)
    assert losses[2][-1] < losses[2][0] - 0.3  # and it learned
