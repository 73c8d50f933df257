"""Shared fixtures: a project laid out under a temp folder, tiny synthetic data, a tiny pipeline run.

Everything is CPU-only and seeded. The synthetic task has three labels whose functions use
label-specific identifiers from their first characters on, so a 2-layer, 16-wide model with a
32-token window can pick them up; each source file lies in exactly one split.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.shared.config.base import Paths
from tasks.shared.config.clean import CleanConfig
from tasks.shared.config.distill import DistillConfig
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.config.prune import PruneConfig
from tasks.shared.config.quantize import QuantizeConfig
from tasks.shared.config.sparsify import SparsifyConfig
from tasks.shared.config.tokenize import TokenizeConfig
from tasks.shared.config.training import ModelSpec
from tasks.shared.config.validate import ValidateConfig

ROOT = Path(__file__).resolve().parents[1]


def write_params(folder: Path, **overrides) -> Path:
    """The project's params.yaml with `dotted.key=value` overrides, written to `folder/params.yaml`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    f = folder / "params.yaml"
    f.write_text(yaml.safe_dump(params, sort_keys=False))
    return f


def copy_project(dst: Path) -> Path:
    """The repository's files as git sees them (tracked, plus untracked but not ignored) copied to `dst`."""
    import subprocess

    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


TINY_PROJECT = {
    "ingest": {"packages": ["asyncio", "email", "xml"], "max_files": 8, "min_examples_per_label": 10},
    "clean": {"min_chars": 40},
    "validate": {"min_corpus_rows": 20, "min_rows_per_label": 1},
    "tokenize": {"vocab_size": 512},
    "pretrain": {
        "model": {"preset": "tiny"},
        "max_steps": 300,  # ~6 s: long enough to be killed in the middle (tests/faults)
        "eval_interval": 150,
        "eval_batches": 2,
        "batch_size": 8,
        "checkpoint_interval": 50,
        "deterministic": True,
    },
    # every training row: a class-balanced subset makes the tiny model score below the majority class
    "finetune": {"max_length": 32, "epochs": 1, "max_train_per_label": 0, "batch_size": 16, "deterministic": True},
    "prune": {"recovery_epochs": 1},
    "sparsify": {"recovery_epochs": 0},
    "distill": {"n_layer": 1, "epochs": 1},
    "evaluate": {"latency_samples": 8, "latency_batches": 2, "behavioral_sample": 16},
    "promote": {
        "min_accuracy": 0.0,
        "min_macro_f1": 0.0,
        "min_gain_over_majority": 0.0,
        "max_regression": 1.0,
        "min_behavioral_pass_rate": 0.0,
        "max_perplexity": 1000.0,
    },
}
"""A whole-pipeline config small enough for the tests: the default task on 3 stdlib packages, a tiny
model, bit-exact training (so an interrupted and resumed run can be compared with an uninterrupted one)."""


def make_tiny_project(base: Path, overrides: dict | None = None) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of this repository under `base/project` with TINY_PROJECT params, and the
    environment that keeps its Prefect, MLflow and BentoML state under `base`."""
    import os
    import subprocess
    import sys

    project = base / "project"
    project.mkdir(parents=True)
    copy_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in {**TINY_PROJECT, **(overrides or {})}.items():
        for key, value in values.items():
            params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@lmforge.test", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny"], cwd=project, check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(base / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MLFLOW_TRACKING_URI": f"sqlite:///{base}/mlflow.db",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "BENTOML_HOME": str(base / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        # `dvc exp run` commits experiments: it needs an identity in a fresh repository
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@lmforge.test",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@lmforge.test",
    }
    for var in ("LMFORGE_PARENT_RUN_ID", "PREFECT_API_URL", "LMFORGE_SUPERVISOR_PID", "LMFORGE_MODEL_URI"):
        env.pop(var, None)
    return project, env


@pytest.fixture(scope="session")
def tiny_flow_run(tmp_path_factory) -> dict:
    """One uninterrupted `lmforge pipeline` of a tiny project: its folder, environment, output, time,
    and a snapshot of dvc.lock and metrics/evaluate.json taken right after it (tests may change the
    project later)."""
    import subprocess
    import sys
    import time

    base = tmp_path_factory.mktemp("lmforge")
    project, env = make_tiny_project(base)
    start = time.perf_counter()
    lmforge = str(Path(sys.executable).parent / "lmforge")
    res = subprocess.run([lmforge, "pipeline"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    output = res.stdout + res.stderr
    (base / "pipeline.log").write_text(output)
    assert res.returncode == 0, output[-6000:]
    return {
        "dir": project,
        "env": env,
        "output": output,
        "seconds": time.perf_counter() - start,
        "dvc_lock": yaml.safe_load((project / "dvc.lock").read_text()),
        "evaluation": yaml.safe_load((project / "metrics" / "evaluate.json").read_text()),
    }


# Servers and background commands the integration tests start (Prefect, MLflow, workers, schedules).
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(cmd: list[str], cwd: Path, env: dict, log: Path):
    """`cmd` in a session of its own (stop it with `stop_group`), stdout and stderr into `log`."""
    import subprocess

    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(proc) -> None:
    """SIGTERM to the process group `start_logged` made, SIGKILL after 15 s."""
    from tasks.ops.servers import stop_group as stop

    stop(proc)


def stop_server(proc) -> None:
    """Stop a `bentoml serve` and its workers (BentoML starts each worker in a session of its own)."""
    import os
    import signal
    import subprocess

    import psutil

    try:
        groups = {os.getpgid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True) if p.is_running()}
    except (psutil.NoSuchProcess, ProcessLookupError):
        groups = set()
    for pgid in {proc.pid, *groups}:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, object]:
    """POST `body` as JSON: (status, decoded reply), for 4xx/5xx replies too."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_http(url: str, proc, log: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; fails with the log's tail if `proc` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


# Ways to damage an artifact file (the fault tests of checkpoints, bundles and models share them).
def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def append(f: Path) -> None:
    f.write_bytes(f.read_bytes() + b"\0")


def garbage(f: Path) -> None:
    f.write_text("{not json")


def delete(f: Path) -> None:
    f.unlink()


PARAMS_PATHS: dict[str, str] = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]

SEED = 1337
FILES_PER_SPLIT = {"train": 8, "val": 2, "test": 2}
FUNCTIONS_PER_FILE = 6
VOCAB = {
    "net": ["socket", "packet", "host", "port", "recv", "send", "proxy", "tcp", "udp", "peer"],
    "db": ["cursor", "query", "table", "row", "commit", "schema", "index", "column", "txn", "sql"],
    "ui": ["widget", "button", "window", "click", "render", "layout", "color", "canvas", "menu", "font"],
}
LABELS = sorted(VOCAB)

# Small enough that the whole tiny pipeline runs in seconds on 2 CPU cores.
TINY_CLEAN = CleanConfig(min_chars=40)
TINY_VALIDATE = ValidateConfig(min_corpus_rows=20, min_rows_per_label=3)
TINY_TOKENIZE = TokenizeConfig(vocab_size=300, min_frequency=2, val_fraction=0.1, seed=SEED)
TINY_PRETRAIN = PretrainConfig(
    model=ModelSpec(preset="tiny"),
    batch_size=8,
    max_steps=20,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    eval_interval=10,
    eval_batches=2,
    log_interval=2,
    seed=SEED,
)
# batch 4 / lr 5e-3 / 2 epochs: over 32 seeds the tiny model's test accuracy never fell below 0.67 (chance 0.33).
# Every baseline is trained too, at 16 wide, so the stage's baseline outputs are exercised.
TINY_FINETUNE = FinetuneConfig(
    max_length=32,
    batch_size=4,
    epochs=2,
    lr=5e-3,
    min_lr=5e-4,
    warmup_steps=2,
    max_train_per_label=0,
    seed=SEED,
    baselines=["scratch", "cnn", "gru"],
    cnn_embd=16,
    cnn_channels=16,
    gru_embd=16,
    gru_hidden=16,
)
TINY_PRUNE = PruneConfig(recovery_epochs=1)
TINY_SPARSIFY = SparsifyConfig(recovery_epochs=0)
TINY_DISTILL = DistillConfig(n_layer=1, epochs=1)
TINY_QUANTIZE = QuantizeConfig(backend="torch.ao")
TINY_EVALUATE = EvaluateConfig(
    batch_size=32, latency_samples=4, latency_batches=2, behavioral_sample=16, tfidf_max_features=200
)


def pytest_configure(config) -> None:
    """One intra-op thread: tiny models are faster single-threaded and immune to a busy machine."""
    import torch

    torch.set_num_threads(1)


def make_paths(root: Path) -> Paths:
    """A Paths with every entry of params.yaml's `paths:` block placed under `root`."""
    return Paths(**{k: Path(root) / v for k, v in PARAMS_PATHS.items()})


def _project(root: Path) -> Paths:
    paths = make_paths(root)
    shutil.copytree(ROOT / "gx", paths.gx, ignore=shutil.ignore_patterns("uncommitted", ".ge_store_backend_id"))
    paths.behavioral.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "data" / "behavioral" / "mft.jsonl", paths.behavioral)
    return paths


@pytest.fixture
def tiny_project(tmp_path) -> Paths:
    """Paths under tmp_path, with the real Great Expectations project (gx/) copied in."""
    return _project(tmp_path)


def _function(rng: random.Random, label: str, file_no: int, fn_no: int) -> str:
    w = VOCAB[label]
    a, b, c, d, e, f, g = rng.sample(w, 7)
    return (
        f"def {label}_{a}_{b}_{file_no}_{fn_no}(self, {c}, {d}=None):\n"
        f'    """{a.capitalize()} the {b} {c} of this {label} {e}."""\n'
        f"    {a} = self.{b}.{c}({d})\n"
        f"    if {a} is None:\n"
        f'        raise ValueError("{label} {c} {d} missing")\n'
        f"    for {e} in {a}.{f}s():\n"
        f"        self.{g}_{e}({e}, {d})\n"
        f"    return {label}_{a}"
    )


def tiny_labeled(seed: int = SEED) -> pd.DataFrame:
    """Labeled rows (text, label, source, split): 3 labels, whole files per split, unique texts."""
    rng = random.Random(seed)
    rows = []
    for label in LABELS:
        file_no = 0
        for split, n_files in FILES_PER_SPLIT.items():
            for _ in range(n_files):
                source = f"{label}/mod_{file_no:02d}.py"
                for fn_no in range(FUNCTIONS_PER_FILE):
                    rows.append(
                        {
                            "text": _function(rng, label, file_no, fn_no),
                            "label": label,
                            "source": source,
                            "split": split,
                        }
                    )
                file_no += 1
    return pd.DataFrame(rows, columns=["text", "label", "source", "split"])


def tiny_corpus(labeled: pd.DataFrame) -> pd.DataFrame:
    """Pretraining corpus (text, source, kind): each training file's code plus its docstrings."""
    rows = []
    for source, g in labeled[labeled["split"] == "train"].groupby("source", sort=True):
        rows.append({"text": "\n\n\n".join(g["text"]), "source": source, "kind": "code"})
        docs = [t.split('"""')[1] for t in g["text"]]
        rows.append({"text": " ".join(docs) + f" ({source})", "source": source, "kind": "docstring"})
    return pd.DataFrame(rows, columns=["text", "source", "kind"])


def write_raw(
    paths: Paths, labeled: pd.DataFrame | None = None, corpus: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the raw parquet files (what ingest would produce); returns (labeled, corpus)."""
    labeled = tiny_labeled() if labeled is None else labeled
    corpus = tiny_corpus(labeled) if corpus is None else corpus
    Path(paths.raw_labeled).parent.mkdir(parents=True, exist_ok=True)
    labeled.to_parquet(paths.raw_labeled, index=False)
    corpus.to_parquet(paths.raw_corpus, index=False)
    return labeled, corpus


@pytest.fixture
def tiny_raw(tiny_project) -> Paths:
    """A project whose raw corpus and labeled set hold the synthetic data."""
    write_raw(tiny_project)
    return tiny_project


@pytest.fixture
def tiny_clean(tiny_raw) -> Paths:
    """A project with cleaned synthetic data (not yet validated)."""
    from tasks import clean

    clean.run(TINY_CLEAN, tiny_raw)
    return tiny_raw


@dataclass
class PipelineRun:
    """Outputs of the tiny end-to-end run."""

    paths: Paths
    clean: object
    validate: object
    tokenize: object
    pretrain: object
    finetune: object
    prune: object
    sparsify: object
    distill: object
    quantize: object
    evaluate: object


def run_tiny_pipeline(paths: Paths) -> PipelineRun:
    """clean -> validate -> tokenize -> pretrain -> finetune -> prune, sparsify, distill -> quantize -> evaluate
    on the tiny data."""
    from tasks import clean, distill, evaluate, finetune, pretrain, prune, quantize, sparsify, tokenize, validate

    write_raw(paths)
    c = clean.run(TINY_CLEAN, paths)
    v = validate.run(TINY_VALIDATE, TINY_CLEAN, LABELS, True, paths)
    t = tokenize.run(TINY_TOKENIZE, paths)
    p = pretrain.run(TINY_PRETRAIN, paths)
    f = finetune.run(TINY_FINETUNE, paths)
    pr = prune.run(TINY_PRUNE, TINY_FINETUNE, paths)
    sp = sparsify.run(TINY_SPARSIFY, TINY_FINETUNE, paths)
    di = distill.run(TINY_DISTILL, TINY_FINETUNE, paths)
    q = quantize.run(TINY_QUANTIZE, paths)
    e = evaluate.run(TINY_EVALUATE, paths)
    return PipelineRun(paths, c, v, t, p, f, pr, sp, di, q, e)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> PipelineRun:
    """The tiny pipeline, run once per session; tests must treat its outputs as read-only."""
    return run_tiny_pipeline(_project(tmp_path_factory.mktemp("pipeline")))
