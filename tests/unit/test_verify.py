"""`lmforge verify`'s comparison on made-up records: which file differs first, which stage went another way, which
stages a variant needs, and what the dvc.lock recorded beside a version says. The real rebuild of a registered
version is in tests/integration/test_verify.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.ops import lineage
from tasks.ops.verify import (
    Recorded,
    cached_outs,
    first_difference,
    first_stage,
    legacy_lineage,
    model_files,
    producer,
    upstream,
)
from tasks.shared.errors import UserError

ENTRIES = {
    "dvc.tokenize.deps.data/clean/corpus.parquet": "c1",
    "dvc.tokenize.outs.data/tokenizer": "t1.dir",
    "dvc.tokenize.outs.metrics/tokenize.json": "m1",
    "dvc.pretrain.deps.data/tokens": "k1.dir",
    "dvc.pretrain.deps.tasks/pretrain.py": "p0",
    "dvc.pretrain.outs.data/models/lm": "lm1.dir",
    "dvc.tokenize.outs.data/tokens": "k1.dir",
    "dvc.finetune.deps.data/models/lm": "lm1.dir",
    "dvc.finetune.deps.data/tokenizer": "t1.dir",
    "dvc.finetune.outs.data/models/classifier": "f1.dir",
    "dvc.quantize.deps.data/models/classifier": "f1.dir",
    "dvc.quantize.outs.data/models/quantized": "q1.dir",
    "dvc.evaluate.deps.data/models/quantized": "q1.dir",
}
"""`dvc.<stage>.<deps|outs>.<path>`: md5 of the dvc.lock that the tests below write."""


def recorded_lock(entries: dict[str, str], folder: Path) -> dict:
    """`lineage.lock_record` of a dvc.lock written under `folder` with these `ENTRIES`-style entries."""
    stages: dict = {}
    for key, md5 in entries.items():
        _, stage, kind, path = key.split(".", 3)
        stages.setdefault(stage, {"cmd": f"python -m tasks.{stage}"}).setdefault(kind, []).append(
            {"path": path, "hash": "md5", "md5": md5}
        )
    lock_file = Path(folder) / "dvc.lock"
    lock_file.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))
    return lineage.lock_record(lock_file)


def _recorded(folder: Path) -> Recorded:
    return Recorded("lmforge-classifier", "3", "abc", "int8", "", None, {}, recorded_lock(ENTRIES, folder))


def test_the_recorded_dvc_lock_becomes_stage_records(tmp_path):
    lock = recorded_lock(ENTRIES, tmp_path)
    assert lock["tokenize"]["outs"] == {
        "data/tokenizer": "t1.dir",
        "metrics/tokenize.json": "m1",
        "data/tokens": "k1.dir",
    }
    assert lock["pretrain"]["deps"]["tasks/pretrain.py"] == "p0" and "variant" not in lock


def test_the_variant_is_rebuilt_by_the_stage_that_writes_its_folder_and_what_it_needs(tmp_path):
    rec = _recorded(tmp_path)
    assert producer(rec, Path("data/models/quantized/int8")) == "quantize"
    assert producer(rec, Path("data/models/classifier")) == "finetune"
    with pytest.raises(UserError, match="no recorded stage writes data/models/pruned"):
        producer(rec, Path("data/models/pruned"))
    assert sorted(upstream("quantize", rec.lock)) == ["finetune", "pretrain", "quantize", "tokenize"]
    assert sorted(upstream("pretrain", rec.lock)) == ["pretrain", "tokenize"]  # evaluate is downstream: not rebuilt


def test_first_differing_file_is_named_with_how_it_differs():
    registered = {"artifacts/bundle/lm/model.safetensors": "aa" * 32, "code/models/x.py": "bb" * 32}
    assert first_difference(registered, dict(registered)) is None
    rel, how = first_difference(registered, {**registered, "artifacts/bundle/lm/model.safetensors": "cc" * 32})
    assert (
        rel == "artifacts/bundle/lm/model.safetensors" and how == "sha256 aaaaaaaaaaaa registered, cccccccccccc rebuilt"
    )
    assert first_difference(registered, {"code/models/x.py": "bb" * 32})[1].startswith("registered, but the rebuild")
    assert first_difference(registered, {**registered, "extra.txt": "dd"}) == (
        "extra.txt",
        "produced by the rebuild, but not registered",
    )


def test_first_differing_stage_follows_the_dag_and_ignores_metrics_and_plots(tmp_path):
    dvc_yaml = {
        "stages": {
            "tokenize": {"outs": ["${paths.tokenizer}", {"${paths.tokens}": {"persist": True}}]},
            "pretrain": {
                "outs": [{"${paths.lm}": {"persist": True}}, {"metrics/plots/loss.csv": {"cache": False}}],
                "metrics": [{"metrics/pretrain.json": {"cache": False}}],
            },
            "finetune": {"outs": [{"${paths.classifier}": {"persist": True}}]},
        }
    }
    params = {
        "paths": {"tokenizer": "data/tokenizer", "tokens": "data/tokens", "lm": "data/models/lm/", "classifier": "c"}
    }
    cached = cached_outs(dvc_yaml, params)
    assert cached == {"tokenize": ["data/tokenizer", "data/tokens"], "pretrain": ["data/models/lm"], "finetune": ["c"]}
    recorded = recorded_lock(ENTRIES, tmp_path)

    def rebuilt(**md5s) -> dict:
        outs = {"tokenize": ["data/tokenizer", "data/tokens"], "pretrain": ["data/models/lm", "metrics/pretrain.json"]}
        return {
            stage: {
                "outs": [
                    {"path": p, "md5": md5s.get(p.replace("/", "_").replace(".", "_"), recorded[stage]["outs"].get(p))}
                    for p in ps
                ]
            }
            for stage, ps in outs.items()
        }

    order = ["tokenize", "pretrain", "finetune"]
    assert first_stage(order, cached, recorded, rebuilt()) is None
    # the timings in pretrain's metrics always differ: not a difference
    assert first_stage(order, cached, recorded, rebuilt(metrics_pretrain_json="other")) is None
    assert first_stage(order, cached, recorded, rebuilt(data_models_lm="x.dir")) == "pretrain (data/models/lm)"
    both = rebuilt(data_models_lm="x.dir", data_tokens="y.dir")
    assert first_stage(order, cached, recorded, both) == "tokenize (data/tokens)"  # upstream first


def test_promote_records_each_models_precision_from_the_stage_metrics(tmp_path):
    (tmp_path / "pretrain.json").write_text(json.dumps({"precision": "bf16", "precision_probe_bf16_ms": 1.0}))
    (tmp_path / "finetune.json").write_text(
        json.dumps({"precision": "fp32", "baselines": {"cnn": {"precision": "bf16"}, "gru": {"precision": "fp32"}}})
    )
    (tmp_path / "prune.json").write_text(json.dumps({"precision": None}))  # no recovery fine-tune: nothing trained
    (tmp_path / "evaluate.json").write_text(json.dumps({"variants": {"fp32": {"per_class": {"precision": 0.5}}}}))
    stages = ["pretrain", "finetune", "prune", "sparsify", "evaluate"]
    assert lineage.precisions(tmp_path, stages) == {
        "pretrain": "bf16",
        "finetune": "fp32",
        "cnn": "bf16",
        "gru": "fp32",
    }


def test_input_files_are_listed_by_md5_only_while_they_are_what_dvc_lock_recorded(tmp_path):
    from tasks.shared.datasets import dvc_md5

    user = tmp_path / "data" / "user"
    (user / "docs").mkdir(parents=True)
    (user / "README.md").write_text("read me")
    (user / "docs" / "a.md").write_text("a")
    (tmp_path / "mft.jsonl").write_text("{}\n")
    lock = tmp_path / "dvc.lock"
    stages = {
        "ingest": {"deps": [{"path": "data/user", "md5": dvc_md5(user)}, {"path": "tasks/ingest.py", "md5": "0"}]},
        "evaluate": {"deps": [{"path": "mft.jsonl", "md5": dvc_md5(tmp_path / "mft.jsonl")}]},
    }
    lock.write_text(json.dumps({"schema": "2.0", "stages": stages}))
    files = lineage.data_files(lock, tmp_path)
    assert files == {
        "data/user": {"README.md": dvc_md5(user / "README.md"), "docs/a.md": dvc_md5(user / "docs" / "a.md")},
        "mft.jsonl": {"": dvc_md5(tmp_path / "mft.jsonl")},
    }
    (user / "docs" / "a.md").write_text("changed since the run")
    assert list(lineage.data_files(lock, tmp_path)) == ["mft.jsonl"]


def test_inputs_are_restored_by_md5_from_the_dvc_cache_when_the_workspace_moved_on(tmp_path):
    """The user's data changed since the run (and its old bytes are only in the DVC cache): the worktree gets the
    bytes the version was built from, a file the run did not have is removed, a file git restored is kept."""
    from tasks.ops.verify import cache_path, restore_inputs
    from tasks.shared.datasets import dvc_md5

    root, wt = tmp_path / "root", tmp_path / "wt"
    for base in (root, wt):
        (base / "data" / "user").mkdir(parents=True)
        (base / "data" / "user" / "README.md").write_text("read me")
    old = root / "data" / "user" / "tickets.jsonl"
    old.write_text('{"text": "the run read this"}\n')
    files = {"README.md": dvc_md5(old.parent / "README.md"), "tickets.jsonl": dvc_md5(old)}
    folder_md5 = dvc_md5(old.parent)
    cached = cache_path(root / ".dvc" / "cache", files["tickets.jsonl"])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(old.read_bytes())
    old.write_text('{"text": "edited since"}\n')
    (wt / "data" / "user" / "stray.md").write_text("not in the run")
    entries = {"dvc.ingest.deps.data/user": folder_md5, "dvc.ingest.outs.data/raw/labeled.parquet": "r"}
    rec = Recorded("m", "1", "abc", "fp32", "", {"data/user": files}, {}, recorded_lock(entries, tmp_path))
    restore_inputs(wt, root, rec)
    assert dvc_md5(wt / "data" / "user") == folder_md5
    assert (wt / "data" / "user" / "tickets.jsonl").read_text() == '{"text": "the run read this"}\n'
    cached.unlink()
    (wt / "data" / "user" / "tickets.jsonl").write_text("x")
    with pytest.raises(UserError, match="neither in the workspace nor in the DVC cache"):
        restore_inputs(wt, root, rec)


def test_a_version_registered_by_an_older_lmforge_is_read_from_its_tags():
    """Before the promote run kept dvc.lock, a version carried it as `dvc.*` tags and each precision as a tag."""
    tags = {
        "dvc.tokenize.outs.data/tokens": "k1.dir",
        "dvc.pretrain.deps.tasks/pretrain.py": "p0",
        "precision.pretrain": "bf16",
        "precision.cnn": "fp32",
        "git_commit": "abc",
    }
    lock, chosen = legacy_lineage(tags)
    assert lock == {"tokenize": {"outs": {"data/tokens": "k1.dir"}}, "pretrain": {"deps": {"tasks/pretrain.py": "p0"}}}
    assert chosen == {"pretrain": "bf16", "cnn": "fp32"}
    assert legacy_lineage({"precision": '{"pretrain": "fp32"}', "lineage.data": "x"}) == ({}, {})


def test_the_logging_record_and_the_input_example_are_not_compared(tmp_path):
    for name in ("MLmodel", "input_example.json", "serving_input_example.json", "data/model.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert list(model_files(tmp_path)) == ["data/model.safetensors"]
