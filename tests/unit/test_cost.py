"""What a stage costs (tasks/shared/cost.py): RAPL counters on a fake powercap folder, CPU and memory of a
process tree, the cost table, and the cost block the stage harness writes and logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.ops.dag import load_dvc_yaml, stage_names
from tasks.shared.cost import (
    REPORTED_STAGES,
    ROOT_ENV,
    Meter,
    cost_markdown,
    nvml_counters,
    rapl_counters,
    read_costs,
    stage_cost_report,
    stage_root,
    tree_usage,
)

ROOT = Path(__file__).resolve().parents[2]
MAX_UJ = 262_143_328_850
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
"""A child program that spends `s` CPU seconds."""


def zone(powercap: Path, name: str, label: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    """One powercap zone as the kernel lays it out: name, energy_uj, max_energy_range_uj."""
    d = powercap / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.fixture
def powercap(tmp_path):
    """Two sockets, a core subzone and a psys zone (both overlap the packages, so neither may be summed)."""
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 1_000_000)
    zone(root, "intel-rapl:0:0", "core", 500_000)
    zone(root, "intel-rapl:1", "package-1", MAX_UJ - 2_000_000)
    zone(root, "intel-rapl:2", "psys", 9_000_000)
    return root


def test_rapl_sums_the_package_domains_across_a_wraparound(powercap):
    counters, source = rapl_counters(powercap)
    assert [c.name for c in counters] == ["intel-rapl:0", "intel-rapl:1"]
    assert source == f"RAPL: 2 package domain(s) under {powercap} (whole sockets)"
    start = [c.read() for c in counters]
    (powercap / "intel-rapl:0" / "energy_uj").write_text("4000000\n")  # +3 J
    (powercap / "intel-rapl:0:0" / "energy_uj").write_text("2500000\n")  # inside package-0: not added again
    (powercap / "intel-rapl:1" / "energy_uj").write_text("5000000\n")  # wrapped: 2 J to the top, then 5 J
    assert sum(c.joules(a, c.read()) for c, a in zip(counters, start)) == pytest.approx(10.0)


def test_the_meter_reports_rapl_joules_from_the_folder_it_is_given(powercap):
    meter = Meter.start(powercap)
    (powercap / "intel-rapl:0" / "energy_uj").write_text("1500000\n")
    cost = meter.stop()
    if meter.counters[2:]:  # a GPU with NVML beside the fake sockets: its energy adds to theirs
        assert cost.joules >= 0.5
    else:
        assert cost.joules == pytest.approx(0.5)
    assert cost.energy_source.startswith(f"RAPL: 2 package domain(s) under {powercap}")


def test_without_rapl_or_nvml_joules_are_null_and_the_source_says_why(tmp_path):
    missing = tmp_path / "no-powercap"
    cost = Meter.start(missing).stop().as_dict()
    gpus, gpu_note = nvml_counters()
    if gpus:  # this host has NVML energy: the other branch is what a CPU host reports
        assert cost["joules"] is not None and cost["energy_source"] == gpu_note
    else:
        assert cost["joules"] is None
        assert cost["energy_source"] == f"none: no RAPL under {missing}, {gpu_note}"
        assert gpu_note.startswith("no NVML")


def test_an_unreadable_counter_is_a_reason_not_a_crash(powercap):
    energy = powercap / "intel-rapl:1" / "energy_uj"
    energy.unlink()
    energy.mkdir()  # unreadable even for root, as energy_uj is for users on most kernels
    counters, source = rapl_counters(powercap)
    assert counters == [] and source.startswith(f"RAPL under {powercap} not readable (intel-rapl:1: ")
    assert rapl_counters(powercap / "intel-rapl:2") == ([], f"no RAPL package domain under {powercap}/intel-rapl:2")


def test_cpu_and_peak_memory_include_reaped_and_live_children():
    """A reaped child counts (clean's workers), and so does a live descendant (the other torchrun workers)."""
    before, _ = tree_usage(stage_root())
    alloc = "x = b'x' * (300 * 2**20)\n"
    subprocess.run([sys.executable, "-c", BURN.format(s=0.4) + alloc], check=True)
    live = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.4) + "time.sleep(60)\n"])
    try:
        deadline = time.monotonic() + 30
        while sum(live_cpu(live.pid)) < 0.4 and time.monotonic() < deadline:  # it has burnt, and sleeps
            time.sleep(0.05)
        cpu, peak_mb = tree_usage(stage_root())
    finally:
        live.kill()
        live.wait()
    assert cpu - before >= 0.8
    assert peak_mb >= 300


def live_cpu(pid: int) -> tuple[float, float]:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def test_the_stage_root_is_the_launcher_only_when_it_is_an_ancestor():
    code = "from tasks.shared.cost import stage_root; print(stage_root().pid)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for named, expected in ((str(os.getpid()), os.getpid()), ("999999999", None), ("", None)):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, ROOT_ENV: named}, capture_output=True, text=True, check=True
        )
        pid = int(out.stdout)
        assert pid == expected if expected else pid != os.getpid()


def test_the_cost_table_sums_seconds_and_joules_and_takes_the_largest_memory(tmp_path):
    a = {"wall_s": 1.5, "cpu_s": 2.0, "peak_rss_mb": 300.0, "joules": 10.0, "energy_source": "RAPL: x"}
    b = {"wall_s": 2.25, "cpu_s": 1.0, "peak_rss_mb": 900.5, "joules": 5.5, "energy_source": "RAPL: x"}
    (tmp_path / "ingest.json").write_text(json.dumps({"rows": 3, "cost": a}))
    (tmp_path / "clean.json").write_text(json.dumps({"rows": 3, "cost": b}))
    (tmp_path / "validate.json").write_text(json.dumps({"rows": 3}))  # written before costs were recorded
    costs = read_costs(tmp_path, ["ingest", "clean", "validate", "tokenize"])
    assert costs == {"ingest": a, "clean": b, "validate": None, "tokenize": None}
    table = cost_markdown({"ingest": a, "clean": b})
    assert "| **total** | 3.75 | 3.0 | 900.5 | 15.5 |" in table and table.endswith("Energy: RAPL: x.\n")
    no_energy = cost_markdown(costs | {"clean": b | {"joules": None}})
    assert "| validate | not recorded | | | |" in no_energy
    assert "| **total** | 3.75 | 3.0 | 900.5 |  |" in no_energy  # joules of a part are not a total


def test_evaluate_depends_on_the_metrics_of_every_stage_it_reports():
    names = stage_names(ROOT)
    assert REPORTED_STAGES == tuple(names[: names.index("evaluate")])
    deps = load_dvc_yaml(ROOT)["stages"]["evaluate"]["deps"]
    assert [d for d in deps if d.startswith("${paths.metrics}/")] == [
        f"${{paths.metrics}}/{s}.json" for s in REPORTED_STAGES
    ]


def test_the_report_section_has_a_row_per_upstream_stage(tmp_path):
    cost = {"wall_s": 1.0, "cpu_s": 2.0, "peak_rss_mb": 3.0, "joules": None, "energy_source": "none: x"}
    (tmp_path / "pretrain.json").write_text(json.dumps({"cost": cost}))
    section = stage_cost_report(tmp_path)
    assert section.startswith("\n## Cost of each stage\n")
    assert "| pretrain | 1.0 | 2.0 | 3.0 |  |" in section and "| **total** | 1.0 | 2.0 | 3.0 |  |" in section
    assert all(f"| {s} | not recorded |" in section for s in REPORTED_STAGES if s != "pretrain")


DEMO_STAGE = textwrap.dedent(
    """
    import subprocess, sys

    from tasks.shared.harness import stage_main


    def run(params, tracker):
        subprocess.run([sys.executable, "-c", {burn!r}], check=True)  # a worker process, as clean starts
        return {{"rows": 3}}


    stage_main("demo", run, {{}})
    """
)


@pytest.mark.slow
def test_the_harness_records_the_cost_in_the_metrics_file_and_the_mlflow_run(tmp_path):
    (tmp_path / "demo.py").write_text(DEMO_STAGE.format(burn=BURN.format(s=0.5)))
    write_params(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    for var in ("LMFORGE_PARENT_RUN_ID", "LMFORGE_SUPERVISOR_PID", "LMFORGE_STAGE_STATUS", ROOT_ENV):
        env.pop(var, None)
    started = time.time()
    res = subprocess.run([sys.executable, "demo.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    took = time.time() - started
    assert res.returncode == 0, res.stderr
    metrics_dir = tmp_path / yaml.safe_load((tmp_path / "params.yaml").read_text())["paths"]["metrics"]
    cost = json.loads((metrics_dir / "demo.json").read_text())["cost"]
    assert set(cost) == {"wall_s", "cpu_s", "peak_rss_mb", "joules", "energy_source"}
    assert 0 < cost["wall_s"] <= took and cost["cpu_s"] >= 0.5 + 1.0  # the worker, and the imports (mlflow)
    assert cost["peak_rss_mb"] > 50

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`lmforge.stage` = 'demo'")
    logged = run.data.metrics
    assert {k: logged[f"cost.{k}"] for k in ("wall_s", "cpu_s", "peak_rss_mb")} == {
        k: cost[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")
    }
    assert ("cost.joules" in logged) == (cost["joules"] is not None)
    assert run.data.tags["lmforge.energy_source"] == cost["energy_source"]
