"""Shared fixtures: one definition of "tiny", a project laid out under a temp folder, tiny synthetic data,
one tiny pipeline per session (in process) and one real `lmforge pipeline` per session that modules copy.

Everything is CPU-only and seeded. The synthetic task has three labels whose functions use
label-specific identifiers from their first characters on, so a 2-layer, 16-wide model with a
32-token window can pick them up; each source file lies in exactly one split.

`make test` runs the suite on pytest-xdist workers (`--dist loadfile`: a module stays on one worker, so
module fixtures and their ports and folders are never shared). The session fixtures are built once for
all workers (`once_per_session`), and the longest modules are handed out first (LONGEST_FIRST).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

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
from tasks.shared.config.validate import ValidateConfig

ROOT = Path(__file__).resolve().parents[1]
LMFORGE = str(Path(sys.executable).parent / "lmforge")
T = TypeVar("T")


def run_bench(name: str, *args: str) -> tuple[dict, str]:
    """Run bench/<name>.py with `args` in a fresh interpreter, as a user would: its JSON last line and its stdout
    (the run must succeed; its stderr's tail is the failure message)."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stdout


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


def update_params(project: Path, sections: dict[str, dict]) -> None:
    """Set keys of `project`/params.yaml, section by section (the other keys stay)."""
    f = project / "params.yaml"
    params = yaml.safe_load(f.read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    f.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(dst: Path) -> Path:
    """The repository's files as git sees them (tracked, plus untracked but not ignored) copied to `dst`."""
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


# --- What "tiny" means: one definition -------------------------------------------------------------------

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

TINY: dict[str, dict] = {
    "clean": {"min_chars": 40},
    "validate": {"min_corpus_rows": 20, "min_rows_per_label": 3},
    "tokenize": {"vocab_size": 300, "min_frequency": 2, "val_fraction": 0.1, "seed": SEED},
    "pretrain": {
        "model": {"preset": "tiny"},
        "batch_size": 8,
        "max_steps": 20,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 10,
        "eval_batches": 2,
        "log_interval": 2,
        "seed": SEED,
    },
    # batch 4 / lr 5e-3 / 2 epochs: over 32 seeds the tiny model's test accuracy never fell below 0.67 (chance
    # 0.33). Every baseline is trained too, at 16 wide, so the stage's baseline outputs are exercised.
    "finetune": {
        "max_length": 32,
        "batch_size": 4,
        "epochs": 2,
        "lr": 5e-3,
        "min_lr": 5e-4,
        "warmup_steps": 2,
        "max_train_per_label": 0,
        "seed": SEED,
        "baselines": ["scratch", "cnn", "gru"],
        "cnn_embd": 16,
        "cnn_channels": 16,
        "gru_embd": 16,
        "gru_hidden": 16,
    },
    "prune": {"recovery_epochs": 1},
    "sparsify": {"enabled": True, "recovery_epochs": 0},
    "distill": {"n_layer": 1, "epochs": 1},
    "quantize": {"backend": "torch.ao"},
    "evaluate": {
        "batch_size": 32,
        "latency_samples": 4,
        "latency_batches": 2,
        "behavioral_sample": 16,
        "tfidf_max_features": 200,
    },
    "kg_train": {"epochs": 1, "batch_size": 8, "max_length": 32, "seed": SEED},
    "align_train": {
        "epochs": 1,
        "batch_size": 16,
        "max_text_length": 16,
        "max_code_length": 32,
        "frozen_blocks": 0,
        "dim": 16,
        "max_train_pairs": 256,
        "seed": SEED,
    },
    "align_index": {"recall_sample": 100},
    "align_evaluate": {"probe_train_rows": 200, "bootstrap_resamples": 200},
}
"""The tiny configuration, as params.yaml sections: small enough that the whole pipeline runs in seconds on
2 CPU cores. The in-process stage runs use it as is (TINY_<STAGE>); whole-pipeline runs use TINY_PROJECT."""

TINY_CLEAN = CleanConfig(**TINY["clean"])
TINY_VALIDATE = ValidateConfig(**TINY["validate"])
TINY_TOKENIZE = TokenizeConfig(**TINY["tokenize"])
TINY_PRETRAIN = PretrainConfig(**TINY["pretrain"])
TINY_FINETUNE = FinetuneConfig(**TINY["finetune"])
TINY_PRUNE = PruneConfig(**TINY["prune"])
TINY_SPARSIFY = SparsifyConfig(**TINY["sparsify"])
TINY_DISTILL = DistillConfig(**TINY["distill"])
TINY_QUANTIZE = QuantizeConfig(**TINY["quantize"])
TINY_EVALUATE = EvaluateConfig(**TINY["evaluate"])

TINY_PROJECT: dict[str, dict] = {
    **TINY,
    # the default task on 3 stdlib packages instead of the synthetic data
    "ingest": {"packages": ["asyncio", "email", "xml"], "max_files": 8, "min_examples_per_label": 10},
    # long enough to be killed in the middle (tests/faults), and bit-exact, so that an interrupted and resumed
    # run can be compared with the reference run: deterministic kernels, and fp32 (`auto` times bf16 against
    # fp32 on this machine, and a busy machine may choose differently from one run to the next)
    "pretrain": {
        **TINY["pretrain"],
        "max_steps": 200,
        "eval_interval": 100,
        "checkpoint_interval": 40,
        "deterministic": True,
        "precision": "fp32",
    },
    # every training row (a class-balanced subset makes the tiny model score below the majority class),
    # in few large batches
    # read past the tiny LM's block size (32): the sparse attention, tiled positions, the 32-token `short` baseline
    # and the served LM reading as far, through every stage and the service
    "finetune": {
        **TINY["finetune"],
        "max_length": 96,
        "baselines": ["scratch", "cnn", "gru", "short"],
        "batch_size": 16,
        "epochs": 1,
        "deterministic": True,
        "precision": "fp32",
    },
    # the gates are not under test in whole-pipeline runs: a tiny model passes them, on a busy machine too (this
    # one learns little from 8 files: TF-IDF beats it significantly, so the baselines are reported, not gated)
    "promote": {
        "baselines": "report",
        "min_accuracy": 0.0,
        "min_macro_f1": 0.0,
        "min_gain_over_majority": 0.0,
        "max_regression": 1.0,
        "min_behavioral_pass_rate": 0.0,
        "max_perplexity": 1000.0,
        "max_latency_ms": 60000.0,
    },
    # the same for the extractor: a tiny one on a few files is not better than its baselines
    "promote_kg": {"baselines": "report", "max_regression": 1.0, "min_comparable_docs": 1},
    # and for the encoder (the tiny trunk learns little from a few files; its index is exact enough on few items)
    "promote_align": {
        "baselines": "report",
        "max_regression": 1.0,
        "min_comparable_queries": 1,
        "min_index_recall": 0.0,
    },
}
"""TINY for a whole `lmforge pipeline` in a copy of the project (`make_tiny_project`)."""


# --- pytest hooks ---------------------------------------------------------------------------------------

LONGEST_FIRST = (
    "tests/integration/test_team_stack.py",
    "tests/faults/test_kills.py",
    "tests/integration/test_training.py",
    "tests/integration/test_user_data.py",
    "tests/integration/test_retrain.py",
    "tests/integration/test_serving.py",
    "tests/integration/test_pipeline.py",
    "tests/integration/test_verify_rebuild.py",
    "tests/unit/test_service.py",
    "tests/data/test_validate.py",
    "tests/unit/test_cli.py",
    "tests/unit/test_pretrain.py",
    "tests/unit/test_degraded_candidate.py",
)
"""Modules handed out first (longest first) when pytest-xdist workers share the suite (`make test`: a worker per
core and one more): the team stack and the faults (which build the session's reference run) start at once,
the modules that need no reference run come next, then those that copy it; the short modules fill in at the
end. The rest keep the collection order."""


def pytest_configure(config) -> None:
    """One intra-op thread: tiny models are faster single-threaded and immune to a busy machine. Ctrl-C as a
    terminal delivers it: a shell starts background jobs (`make test &`) with SIGINT ignored, and every process
    the tests start would inherit that."""
    import torch

    torch.set_num_threads(1)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def once_per_session(tmp_path_factory, name: str, produce: Callable[[Path], T]) -> T:
    """`produce(folder)` once per test session, also when pytest-xdist workers share the session: the first
    worker to ask produces it under a file lock and pickles the result, the others wait and read it (the
    pytest-xdist documentation's pattern). A failure is reported to every worker, never produced twice."""
    import fcntl
    import pickle
    import traceback

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return produce(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above every worker's own
    done, failed = shared / f"{name}.pickle", shared / f"{name}.failed"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"{name} failed on another worker:\n{failed.read_text()[-6000:]}")
        if not done.exists():
            folder = shared / name
            folder.mkdir()
            try:
                result = produce(folder)
            except BaseException:
                failed.write_text(traceback.format_exc())
                raise
            done.write_bytes(pickle.dumps(result))
        return pickle.loads(done.read_bytes())


# --- Whole-pipeline projects: `lmforge pipeline` in a copy of the repository ---------------------------------


def tiny_env(base: Path) -> dict[str, str]:
    """The environment of a project under `base/project` whose Prefect, MLflow and BentoML state lies in `base`."""
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
        # one OpenMP thread per process: pytest-xdist runs two modules at once, and tiny models gain nothing
        # from a second thread; every tiny project runs the same way, so bit-exact comparisons between them hold
        "OMP_NUM_THREADS": "1",
        # `dvc exp run` commits experiments: it needs an identity in a fresh repository
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@lmforge.test",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@lmforge.test",
    }
    for var in ("LMFORGE_PARENT_RUN_ID", "PREFECT_API_URL", "LMFORGE_SUPERVISOR_PID", "LMFORGE_MODEL_URI"):
        env.pop(var, None)
    return env


def make_tiny_project(base: Path, overrides: dict | None = None) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of this repository under `base/project` with TINY_PROJECT params (a section in
    `overrides` replaces TINY_PROJECT's), and the environment that keeps its state under `base`."""
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
    return project, tiny_env(base)


def _reference_run(base: Path) -> dict:
    import time

    project, env = make_tiny_project(base)
    start = time.perf_counter()
    res = subprocess.run([LMFORGE, "pipeline"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    output = res.stdout + res.stderr
    (base / "pipeline.log").write_text(output)
    assert res.returncode == 0, output[-6000:]
    return {
        "base": base,
        "dir": project,
        "env": env,
        "output": output,
        "seconds": time.perf_counter() - start,
        "dvc_lock": yaml.safe_load((project / "dvc.lock").read_text()),
        "evaluation": yaml.safe_load((project / "metrics" / "evaluate.json").read_text()),
    }


@pytest.fixture(scope="session")
def tiny_flow_run(tmp_path_factory) -> dict:
    """The session's reference run: one uninterrupted `lmforge pipeline` of a tiny project, as users run it
    (Prefect's ephemeral server, the embedded MLflow store), built once for all workers. Its folder, environment,
    output, time, dvc.lock and metrics/evaluate.json. Read-only: a test works in a copy (`copy_tiny_run`)."""
    return once_per_session(tmp_path_factory, "tiny-flow-run", _reference_run)


def copy_tiny_run(run: dict, base: Path) -> tuple[Path, dict[str, str]]:
    """A project of one's own in the state the reference run left: the project folder (git, DVC cache, dvc.lock,
    outputs, checkpoints), the MLflow store (with its registered champion) and Prefect's home, under `base`;
    and its environment. MLflow records artifact locations as absolute paths: they are moved along."""
    src = Path(run["base"])
    shutil.copytree(src / "project", base / "project", symlinks=True)
    for folder in ("prefect", "bentoml"):
        if (src / folder).exists():
            shutil.copytree(src / folder, base / folder, symlinks=True)
    shutil.copy2(src / "mlflow.db", base / "mlflow.db")
    _move_paths(base / "mlflow.db", f"{src}/", f"{base}/")
    return base / "project", tiny_env(base)


def _move_paths(db: Path, old: str, new: str) -> None:
    """Replace `old` by `new` in every text value of a sqlite database."""
    import sqlite3

    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')]:
                con.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                    f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                    (old, new, old),
                )
    con.close()


def _empty_mlflow_store(folder: Path) -> Path:
    import contextlib

    from mlflow import MlflowClient

    with contextlib.chdir(folder):  # the Default experiment's artifacts: ./mlruns of the store's folder
        MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    return once_per_session(tmp_path_factory, "mlflow-template", _empty_mlflow_store)


@pytest.fixture
def mlflow_db(tmp_path, _mlflow_template) -> str:
    """The URI of a new, empty MLflow sqlite store at tmp_path/mlflow.db: a copy of one made once per session
    (creating MLflow's tables takes seconds per store)."""
    shutil.copy2(_mlflow_template, tmp_path / "mlflow.db")
    _move_paths(tmp_path / "mlflow.db", f"{_mlflow_template.parent}/", f"{tmp_path}/")
    return f"sqlite:///{tmp_path}/mlflow.db"


# --- Servers and background commands the integration tests start (Prefect, MLflow, workers, schedules) ----


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_logged(cmd: list[str], cwd: Path, env: dict, log: Path):
    """`cmd` in a session of its own (stop it with `stop_group`), stdout and stderr into `log`."""
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(*procs, seconds: float = 15) -> None:
    """SIGTERM to the process groups `start_logged` made, all at once; SIGKILL to those left after `seconds`."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)  # what the group leader left behind


def _signal_group(proc, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_server(proc) -> None:
    """Stop a `bentoml serve` and its workers (BentoML starts each worker in a session of its own)."""
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
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """`PREFECT_API_URL` of a `prefect server start` kept for this worker's session. A run that is not about
    Prefect's ephemeral server (the reference run and the kills use it, as users do) points here and skips
    starting one of its own: 8 s of CPU per run."""
    home = tmp_path_factory.mktemp("prefect-server")
    port, log = free_port(), home / "server.log"
    env = {**tiny_env(home), "PREFECT_HOME": str(home)}
    cmd = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_logged(cmd, home, env, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_group(proc)


# --- Ways to damage an artifact file (the fault tests of checkpoints, bundles and models share them) -------


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


# --- In-process projects: stage `run` functions on the synthetic data -------------------------------------


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
    """The tiny pipeline, run once per session (for all workers); tests must treat its outputs as read-only."""
    return once_per_session(tmp_path_factory, "tiny-pipeline", lambda folder: run_tiny_pipeline(_project(folder)))
