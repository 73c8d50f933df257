"""The one atomic writer: a target is replaced whole or not at all, and leaves no litter behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks.shared.io import atomic_dir, atomic_file, write_csv, write_json


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
        (d / "stale").write_text("old")
    with atomic_dir(target) as d:
        (d / "a").write_text("2")
    assert _listing(target) == ["a"] and (target / "a").read_text() == "2"
    assert _listing(tmp_path) == ["out"]  # no temporary or old folders left behind


def test_failed_block_leaves_the_old_folder_and_no_temp(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(target) as d:
            (d / "partial").write_text("x")
            raise RuntimeError("disk full")
    assert _listing(target) == ["a"] and (target / "a").read_text() == "good"
    assert _listing(tmp_path) == ["out"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_file(target) as tmp:
            tmp.write_text("{half")
            raise ValueError("interrupted")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert _listing(tmp_path) == ["m.json"]


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    """A writer killed with SIGKILL cannot clean up; the next write of that target does."""
    target = tmp_path / "out"
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from tasks.shared.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as d:\n"
        "    (d / 'partial').write_text('x'); os.kill(os.getpid(), 9)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code, str(target), root], capture_output=True, timeout=60)
    assert res.returncode == -9
    assert not target.exists() and len(_listing(tmp_path)) == 1  # only the dead writer's temp folder
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    assert _listing(tmp_path) == ["out"]


def test_write_csv_has_a_header_and_only_the_named_columns(tmp_path):
    f = tmp_path / "p.csv"
    write_csv(f, [{"step": 0, "loss": 1.5, "lr": 0.1}, {"step": 10, "loss": 1.25}], ["step", "loss"])
    assert f.read_text() == "step,loss\n0,1.5\n10,1.25\n"


def test_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600/0700); what is renamed into place follows the umask."""
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "a").write_text("1")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
