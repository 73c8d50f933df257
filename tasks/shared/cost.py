"""What a stage costs: wall and CPU seconds, peak resident memory and, where the host exposes them, joules.

The stage harness starts a `Meter` first thing and stops it once the stage's work and its MLflow writes are
done; the `cost` block lands in `metrics/<stage>.json` and the stage's MLflow run (`cost.wall_s`, ...).

- Wall and CPU seconds count from the start of the stage's process (interpreter start and imports included).
  CPU is user + system time of the process, of every child it has waited for (clean's workers, DataLoader
  workers) and of the processes of its tree still alive. A stage that restarts itself under torchrun names
  its launcher in ROOT_ENV; the worker that reports (rank 0) then measures the launcher's whole tree: the
  launcher, torchrun's agent and every worker of this machine.
- Peak RSS is the largest of the process's and its children's peaks (a maximum, not a sum).
- Joules are read between `Meter.start` and `Meter.stop` from energy counters: Intel RAPL package domains
  under /sys/class/powercap (the whole sockets: other work on the host counts too) and NVML's total energy
  of every visible GPU. With neither, joules are None and `energy_source` says why.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil

from tasks.shared.io import read_json

POWERCAP = Path("/sys/class/powercap")
ROOT_ENV = "LMFORGE_COST_ROOT_PID"
"""The process whose tree is the stage, set by a stage that restarts itself under torchrun."""
REPORTED_STAGES = (
    "ingest",
    "clean",
    "validate",
    "tokenize",
    "pretrain",
    "finetune",
    "prune",
    "sparsify",
    "distill",
    "quantize",
    "onnx",
)
"""The stages whose cost evaluate's report tabulates: every stage before evaluate in dvc.yaml, whose
metrics files are therefore evaluate's deps there (tests/unit/test_cost.py checks both)."""
MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024
"""Bytes per unit of `ru_maxrss` (kilobytes on Linux, bytes on macOS)."""


@dataclass(frozen=True)
class Counter:
    """One energy counter (a RAPL domain's `energy_uj`, a GPU's NVML total) read as an integer."""

    name: str
    read: Callable[[], int]
    joules_per_unit: float
    wraps_at: int = 0
    """The value after which the counter restarts from 0 (RAPL's `max_energy_range_uj`); 0: never."""

    def joules(self, start: int, end: int) -> float:
        """Energy between two readings, across one wraparound."""
        delta = end - start
        if delta < 0 and self.wraps_at:
            delta += self.wraps_at
        return delta * self.joules_per_unit


def rapl_counters(powercap: Path = POWERCAP) -> tuple[list[Counter], str]:
    """The RAPL package domains under `powercap` and a description, or no counter and why.

    Only top-level zones named `package-N`: their subzones (core, uncore, dram) and `psys` overlap them."""
    if not Path(powercap).is_dir():
        return [], f"no RAPL under {powercap}"
    counters = []
    for zone in sorted(Path(powercap).glob("intel-rapl:*")):
        try:
            if zone.name.count(":") != 1 or not (zone / "name").read_text().startswith("package"):
                continue
            counter = Counter(
                zone.name, partial(_read_int, zone / "energy_uj"), 1e-6, _read_int(zone / "max_energy_range_uj")
            )
            counter.read()  # energy_uj is often readable by root only
        except OSError as e:
            return [], f"RAPL under {powercap} not readable ({zone.name}: {e.strerror or e})"
        counters.append(counter)
    if not counters:
        return [], f"no RAPL package domain under {powercap}"
    return counters, f"RAPL: {len(counters)} package domain(s) under {powercap} (whole sockets)"


def nvml_counters() -> tuple[list[Counter], str]:
    """NVML's total-energy counter of every visible GPU and a description, or no counter and why."""
    try:
        import pynvml
    except ImportError:
        return [], "no NVML (the nvidia-ml-py package is not installed)"
    try:
        pynvml.nvmlInit()
        handles = _visible_gpus(pynvml)
        counters = [Counter(f"gpu{i}", partial(_nvml_energy_mj, pynvml, h), 1e-3) for i, h in enumerate(handles)]
        for counter in counters:
            counter.read()  # GPUs before Volta have no energy counter
    except (pynvml.NVMLError, OSError) as e:
        return [], f"no NVML energy ({e})"
    if not counters:
        return [], "no NVML energy (no visible GPU)"
    return counters, f"NVML: total energy of {len(counters)} visible GPU(s)"


def _visible_gpus(pynvml) -> list:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES leaves visible (indices or UUIDs; all when unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [
        pynvml.nvmlDeviceGetHandleByIndex(int(v)) if v.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(v) for v in ids
    ]


def _nvml_energy_mj(pynvml, handle) -> int:
    try:
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except pynvml.NVMLError as e:
        raise OSError(str(e)) from None


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass(frozen=True)
class Cost:
    """What one stage cost."""

    wall_s: float
    cpu_s: float
    """User + system seconds of the stage's processes."""
    peak_rss_mb: float
    """The largest resident set of any of its processes (MiB)."""
    joules: float | None
    """Energy read from the counters `energy_source` names; None without any."""
    energy_source: str

    def as_dict(self) -> dict:
        return {
            "wall_s": round(self.wall_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "joules": None if self.joules is None else round(self.joules, 1),
            "energy_source": self.energy_source,
        }


@dataclass(frozen=True)
class Meter:
    """Started when a stage starts, stopped when its work is done; see the module docstring for what counts."""

    root: psutil.Process
    counters: list[Counter]
    readings: list[int]
    energy_source: str

    @classmethod
    def start(cls, powercap: Path = POWERCAP) -> Meter:
        rapl, rapl_note = rapl_counters(powercap)
        gpus, gpu_note = nvml_counters()
        found = [note for counters, note in ((rapl, rapl_note), (gpus, gpu_note)) if counters]
        source = "; ".join(found) or f"none: {rapl_note}, {gpu_note}"
        counters = rapl + gpus
        return cls(stage_root(), counters, [c.read() for c in counters], source)

    def stop(self) -> Cost:
        cpu_s, peak_rss_mb = tree_usage(self.root)
        joules, source = None, self.energy_source
        if self.counters:
            try:
                joules = sum(c.joules(a, c.read()) for c, a in zip(self.counters, self.readings))
            except OSError as e:  # a counter that stopped answering costs the number, never the stage
                source = f"{source} (unreadable at the end: {e})"
        wall_s = time.time() - self.root.create_time()
        return Cost(wall_s, cpu_s, peak_rss_mb, joules, source)


def stage_root() -> psutil.Process:
    """The process whose tree is the stage: the launcher ROOT_ENV names if it is an ancestor, else this one."""
    me = psutil.Process()
    named = os.environ.get(ROOT_ENV, "")
    return next((p for p in me.parents() if str(p.pid) == named), me)


def tree_usage(root: psutil.Process) -> tuple[float, float]:
    """CPU seconds and peak RSS (MiB) of `root` and its live descendants, each with the children it reaped."""
    me = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(r.ru_utime + r.ru_stime for r in me)
    peak = max(r.ru_maxrss for r in me) * MAXRSS_BYTES
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:  # the launcher is gone: this process is what is left of the stage
        tree = []
    for proc in tree:
        if proc.pid == os.getpid():
            continue
        try:
            t = proc.cpu_times()
            cpu += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
            peak = max(peak, _peak_rss_bytes(proc))
        except psutil.Error:  # it ended (or is not ours) between listing and reading
            continue
    return cpu, peak / 2**20


def _peak_rss_bytes(proc: psutil.Process) -> int:
    """The kernel's high-water mark of a live process's RSS (Linux); its current RSS elsewhere."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


# ---------------------------------------------------------------------------------------------
# the report


def read_costs(metrics: Path, stages: Iterable[str]) -> dict[str, dict | None]:
    """Each stage's `cost` block from `<metrics>/<stage>.json` (None where the file or the block is missing)."""
    files = {s: Path(metrics) / f"{s}.json" for s in stages}
    return {s: read_json(f).get("cost") if f.is_file() else None for s, f in files.items()}


def cost_markdown(costs: dict[str, dict | None]) -> str:
    """One row per stage and a total: wall and CPU seconds and joules summed, the largest peak RSS.

    The total's joules are blank unless every stage has them."""
    lines = ["| stage | wall s | CPU s | peak RSS MB | joules |", "|---|---|---|---|---|"]
    for stage, c in costs.items():
        if c is None:
            lines.append(f"| {stage} | not recorded | | | |")
        else:
            joules = "" if c.get("joules") is None else c["joules"]
            lines.append(f"| {stage} | {c['wall_s']} | {c['cpu_s']} | {c['peak_rss_mb']} | {joules} |")
    known = [c for c in costs.values() if c is not None]
    if known:
        energy = [c.get("joules") for c in costs.values() if c is not None and c.get("joules") is not None]
        joules = round(sum(energy), 1) if len(energy) == len(costs) else ""
        lines.append(
            f"| **total** | {round(sum(c['wall_s'] for c in known), 2)} | {round(sum(c['cpu_s'] for c in known), 2)} "
            f"| {max(c['peak_rss_mb'] for c in known)} | {joules} |"
        )
    sources = sorted({c["energy_source"] for c in known})
    if sources:
        lines += ["", "Energy: " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def stage_cost_report(metrics: Path) -> str:
    """The evaluation report's section on what the stages before evaluate cost, read from their metrics."""
    return (
        "\n## Cost of each stage\n\n"
        "What each upstream stage cost in the run that wrote its current outputs (a stage DVC skipped keeps "
        "its earlier cost): wall and CPU seconds from its process's start, imports included; peak RSS of its "
        "largest process.\n\n" + cost_markdown(read_costs(metrics, REPORTED_STAGES))
    )
