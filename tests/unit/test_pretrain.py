"""The pretrain stage on the tiny project: objectives, model options, resume rules, bad input."""

from __future__ import annotations

import json
import re
import time
import types

import pytest
import torch
from conftest import (
    LABELS,
    TINY_CLEAN,
    TINY_PRETRAIN,
    TINY_TOKENIZE,
    TINY_VALIDATE,
    _project,
    delete,
    flip_byte,
    garbage,
    truncate,
    write_raw,
)

from models.checkpoint import load_lm, read_config
from models.transformer import GPT, GPTConfig
from tasks import pretrain
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.engine import step as engine_step
from tasks.shared.engine.checkpoints import checkpoints
from tasks.shared.engine.runtime import setup_runtime
from tasks.shared.engine.step import step_throughput, train_step
from tasks.shared.errors import UserError
from tasks.shared.tracking import NullTracker


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    from tasks import clean, tokenize, validate

    paths = _project(tmp_path_factory.mktemp("pretrain"))
    write_raw(paths)
    clean.run(TINY_CLEAN, paths)
    validate.run(TINY_VALIDATE, TINY_CLEAN, LABELS, True, paths)
    tokenize.run(TINY_TOKENIZE, paths)
    return paths


def tiny(**kw):
    return TINY_PRETRAIN.model_validate({**TINY_PRETRAIN.model_dump(), "checkpoint_interval": 0, **kw})


def test_masked_lm_objective_trains_a_bidirectional_encoder(tokenized):
    r = pretrain.run(tiny(objective="mlm", max_steps=40, lr=1e-2), tokenized)
    lm = load_lm(tokenized.lm)
    assert lm.config.causal is False and read_config(tokenized.lm)["objective"] == "mlm"
    history = json.loads((tokenized.lm / "history.json").read_text())
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert losses[-1] < losses[0] - 0.5
    assert r.val_loss < 5.5  # ln(300) = 5.7 is chance over the tiny vocabulary


@pytest.mark.parametrize(
    "model", [{"pos_encoding": "rope"}, {"attn_window": 8}, {"pos_encoding": "rope", "attn_window": 8}]
)
def test_model_options_reach_the_saved_model(tokenized, model):
    pretrain.run(tiny(model={"preset": "tiny", **model}), tokenized)
    cfg = load_lm(tokenized.lm).config
    assert all(getattr(cfg, k) == v for k, v in model.items())


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "linear"), ("rmsprop", "constant"), ("adamw", "cosine")])
def test_optimizers_and_schedules_run_through_the_stage(tokenized, optimizer, schedule):
    lr = {"sgd": 0.5, "rmsprop": 2e-3, "adamw": 3e-3}[optimizer]
    r = pretrain.run(tiny(optimizer=optimizer, schedule=schedule, lr=lr, min_lr=lr / 10, max_steps=30), tokenized)
    history = json.loads((tokenized.lm / "history.json").read_text())
    lrs = [h["lr"] for h in history if "lr" in h]
    assert (lrs[-1] == lr) if schedule == "constant" else (lrs[-1] < lr)
    assert r.final_train_loss < 5.6


def test_gradient_accumulation_gives_the_same_run(tokenized):
    same = {"deterministic": True, "precision": "fp32"}  # not `auto`: the probe's timings could differ between runs
    a = pretrain.run(tiny(batch_size=8, **same), tokenized)
    b = pretrain.run(tiny(batch_size=8, micro_batch_size=2, **same), tokenized)
    assert a.final_train_loss == pytest.approx(b.final_train_loss, abs=1e-4)
    assert a.val_loss == pytest.approx(b.val_loss, abs=1e-4)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_names(tokenized, tmp_path):
    eager = pretrain.run(tiny(max_steps=8, deterministic=True), tokenized)
    paths = tokenized.model_copy(update={"lm": tmp_path / "lm", "checkpoints": tmp_path / "ckpt"})
    compiled = pretrain.run(tiny(max_steps=8, compile=True, checkpoint_interval=4), paths)
    assert compiled.final_train_loss == pytest.approx(eager.final_train_loss, abs=1e-3)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-3)
    lm = load_lm(paths.lm)  # torch.compile's `_orig_mod.` prefix must not leak into the saved names
    assert set(lm.state_dict()) == set(load_lm(tokenized.lm).state_dict())


def test_a_finished_or_different_run_is_not_resumed(tokenized):
    pretrain.run(tiny(max_steps=10, checkpoint_interval=5), tokenized)
    again = pretrain.run(tiny(max_steps=10, checkpoint_interval=5), tokenized)
    assert again.resumed_from_step == 0  # the last checkpoint is complete: a rerun trains afresh
    other = pretrain.run(tiny(max_steps=12, lr=1e-3, checkpoint_interval=5), tokenized)
    assert other.resumed_from_step == 0  # different config, different fingerprint


def test_a_fresh_run_clears_an_earlier_runs_checkpoints_so_it_can_resume_its_own(tokenized, capsys):
    """Otherwise the finished run's newer step numbers outrank the new run's: pruning (keep 2) deletes the
    new run's checkpoints and an interrupted rerun cannot resume."""
    ckpts = tokenized.checkpoints / pretrain.CHECKPOINTS
    pretrain.run(tiny(max_steps=10, checkpoint_interval=5), tokenized)
    pretrain.run(tiny(max_steps=8, lr=1e-3, checkpoint_interval=4), tokenized)
    assert [p.name for p in checkpoints(ckpts)] == ["step-00000004", "step-00000008"]
    assert "pretrain: starting afresh; removed 2 checkpoint(s) of an earlier run" in capsys.readouterr().out


def test_resume_never_ignores_checkpoints(tokenized, tmp_path):
    ckpts = tokenized.checkpoints / pretrain.CHECKPOINTS
    pretrain.run(tiny(max_steps=10, checkpoint_interval=5), tokenized)
    # pretend the run stopped at step 5 by removing the final checkpoint
    for p in checkpoints(ckpts)[1:]:
        import shutil

        shutil.rmtree(p)
    assert pretrain.run(tiny(max_steps=10, checkpoint_interval=5, resume="never"), tokenized).resumed_from_step == 0


def test_missing_tokens_is_a_user_error(tiny_project):
    with pytest.raises(UserError, match="meta.json: not found"):
        pretrain.run(tiny(), tiny_project)


def test_mlm_without_a_mask_token_is_a_user_error(tokenized, tmp_path):
    import shutil

    from conftest import make_paths

    paths = make_paths(tmp_path)
    shutil.copytree(tokenized.tokens, paths.tokens)
    meta = json.loads((paths.tokens / "meta.json").read_text())
    meta.pop("mask_id")
    (paths.tokens / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="no <mask> token"):
        pretrain.run(tiny(objective="mlm"), paths)


def test_wrong_process_count_is_a_user_error(tokenized):
    with pytest.raises(UserError, match=r"2 process\(es\) on 1 node\(s\) but 1 are running"):
        pretrain.run(tiny(distributed={"nproc": 2}), tokenized)


def test_batch_settings_that_do_not_divide_name_the_key(tmp_path):
    import yaml
    from conftest import ROOT

    from tasks.shared.config.params import load_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pretrain"]["micro_batch_size"] = 5
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"params.yaml: pretrain: .*multiple of micro_batch_size"):
        load_params(f)


def test_a_masked_lm_trunk_fine_tunes_quantizes_and_serves_without_generate(tokenized, tmp_path):
    from conftest import TINY_FINETUNE, TINY_QUANTIZE

    from deploy.core import CannotGenerate, generate
    from deploy.requests import GenerationRequest
    from deploy.resolve import ServedModel
    from models.bundle import load_parts
    from models.checkpoint import load_classifier
    from tasks import finetune, quantize

    paths = tokenized.model_copy(
        update={k: tmp_path / k for k in ("lm", "checkpoints", "classifier", "baselines", "quantized")}
    )
    pretrain.run(tiny(objective="mlm", max_steps=20, lr=1e-2), paths)
    result = finetune.run(TINY_FINETUNE.model_copy(update={"baselines": ["scratch"], "epochs": 1}), paths)
    assert 0 <= result.val_macro_f1 <= 1
    assert load_classifier(paths.classifier).trunk.config.causal is False
    assert load_classifier(paths.baselines / "scratch").trunk.config.causal is False  # same architecture, random init
    quantize.run(TINY_QUANTIZE.model_copy(update={"sources": ["fp32"]}), paths)

    for classifier in (paths.classifier, paths.quantized / "int8"):
        bundle = load_parts(paths.tokenizer, classifier, paths.lm)
        (pred,) = bundle.classify(["def f(x):\n    return x"])
        assert pred.label in LABELS and sum(pred.probabilities.values()) == pytest.approx(1, abs=1e-4)
        assert not bundle.can_generate
        with pytest.raises(CannotGenerate, match="masked LM"):
            generate(
                ServedModel(bundle, uri=str(classifier), source="folder"), GenerationRequest("def ", max_new_tokens=2)
            )


class Recorder(NullTracker):
    """Keeps what the stage logs."""

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


def test_logged_throughput_has_no_spikes_after_evaluations_or_checkpoints(tokenized, monkeypatch):
    """Every logged tokens/s is within 2x of the stage's overall figure. A checkpoint right before a
    log step (interval 10 and 10) used to restart the clock but keep the window's tokens: ~10x spikes.
    The meter reads the process's CPU time here instead of the wall clock: the suite shares 2 cores between
    3 workers, where a wall-clock window swings 5x with the other workers' load (evaluations and checkpoints
    cost CPU time too, so leaving them out is still what is tested)."""
    monkeypatch.setattr(engine_step, "time", types.SimpleNamespace(perf_counter=time.process_time))
    rec = Recorder()
    cfg = tiny(
        model={"preset": "tiny", "n_embd": 64},
        batch_size=16,
        max_steps=60,
        log_interval=10,
        eval_interval=20,
        eval_batches=4,
        checkpoint_interval=10,
    )
    r = pretrain.run(cfg, tokenized, rec)
    logged = [m["tokens_per_s"] for _, m in rec.logged if "tokens_per_s" in m]
    assert len(logged) == 6  # steps 10, 20, ..., 50 and the last; step 0 is the untimed warm-up step
    assert all(r.tokens_per_s / 2 <= v <= 2 * r.tokens_per_s for v in logged), (r.tokens_per_s, logged)
    assert 0 < r.wall_tokens_per_s < r.tokens_per_s  # the wall figure pays for evaluations and checkpoints
    # the engine benchmark's figure for the same model, measured by the stage beside its own
    assert r.engine_tokens_per_s > 0 and r.loop_efficiency == pytest.approx(
        r.tokens_per_s / r.engine_tokens_per_s, abs=1e-3
    )
    assert r.precision in ("fp32", "bf16") and r.metrics["precision"] == r.precision


def test_the_loop_steps_through_the_engines_train_step_with_its_micro_batches(tokenized, tmp_path, monkeypatch):
    """pretrain's loop is the engine's `train_step` (the unit tests in test_engine.py pin what that does), one
    call per optimizer step, with batch_size / micro_batch_size micro-batches of the global batch."""
    calls = []

    def spy(model, opt, rt, micro_batches, loss_of, grad_clip):
        calls.append([tuple(x.shape) for x, _ in micro_batches])
        return train_step(model, opt, rt, micro_batches, loss_of, grad_clip)

    monkeypatch.setattr(pretrain, "train_step", spy)
    paths = tokenized.model_copy(update={"lm": tmp_path / "lm", "checkpoints": tmp_path / "ckpt"})
    pretrain.run(tiny(max_steps=3, batch_size=8, micro_batch_size=4), paths)
    block = load_lm(paths.lm).config.block_size
    assert calls == [[(4, block), (4, block)]] * 3


def test_the_engine_benchmark_inside_the_stage_leaves_the_training_untouched():
    cfg = PretrainConfig(precision="fp32")
    rt = setup_runtime(cfg)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert step_throughput(model, cfg, rt, batch=4, block=16, vocab=64, fused=False, steps=3, warmup=1) > 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and torch.equal(
        torch.get_rng_state(), rng
    )


def test_loss_curves_are_written_as_plot_data(tokenized):
    pretrain.run(tiny(max_steps=20, log_interval=5, eval_interval=10), tokenized)
    train = (tokenized.plots / pretrain.TRAIN_LOSS_PLOT).read_text().splitlines()
    val = (tokenized.plots / pretrain.VAL_LOSS_PLOT).read_text().splitlines()
    assert train[0] == "step,train_loss" and [line.split(",")[0] for line in train[1:]] == ["0", "5", "10", "15", "19"]
    assert val[0] == "step,val_loss" and [line.split(",")[0] for line in val[1:]] == ["0", "10", "19"]


def test_the_same_training_writes_the_same_model_folder(tokenized, tmp_path):
    """finetune depends on the whole LM folder: timings (which differ run to run) stay out of it, so a
    rerun that trains the same weights leaves finetune up to date."""
    from tasks.shared.datasets import dvc_md5

    digests = []
    for i in range(2):
        paths = tokenized.model_copy(
            update={"lm": tmp_path / f"lm{i}", "checkpoints": tmp_path / f"ckpt{i}", "plots": tmp_path / f"plots{i}"}
        )
        # fp32 pinned: under `auto` the precision probe's timings decide, and they flip on a busy machine
        pretrain.run(tiny(max_steps=12, log_interval=2, deterministic=True, precision="fp32"), paths)
        history = json.loads((paths.lm / "history.json").read_text())
        assert history and not any({"tokens_per_s", "mfu"} & set(h) for h in history)
        digests.append(dvc_md5(paths.lm))
    assert digests[0] == digests[1]


# --- resume from the newest checkpoint that verifies ----------------------------------------------


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tokenized, tmp_path_factory):
    """Checkpoints of a 12-step run stopped right after its step-8 checkpoint: step-4 and step-8 remain."""
    root = tmp_path_factory.mktemp("interrupted")
    paths = tokenized.model_copy(update={"lm": root / "lm", "checkpoints": root / "ckpt", "plots": root / "plots"})
    real = pretrain.save_checkpoint

    def save_then_stop(folder, state, *a, **kw):
        out = real(folder, state, *a, **kw)
        if state.step == 8:
            raise Interrupted
        return out

    pretrain.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Interrupted):
            pretrain.run(tiny(max_steps=12, checkpoint_interval=4), paths)
    finally:
        pretrain.save_checkpoint = real
    assert sorted(p.name for p in (paths.checkpoints / pretrain.CHECKPOINTS).iterdir()) == [
        "step-00000004",
        "step-00000008",
    ]
    return paths.checkpoints


# (file, what happens to it in step-8, the reason printed)
CORRUPTIONS = [
    ("model.safetensors", truncate, "model.safetensors: truncated"),
    ("model.safetensors", flip_byte, "model.safetensors: corrupt (sha256 mismatch)"),
    ("train_state.safetensors", truncate, "train_state.safetensors: truncated"),
    ("train_state.json", garbage, "train_state.json: not valid JSON"),
    ("train_state.safetensors", delete, "train_state.safetensors: missing"),
]


@pytest.mark.parametrize("file,corrupt,reason", CORRUPTIONS, ids=[f"{f}-{c.__name__}" for f, c, _ in CORRUPTIONS])
def test_a_broken_newest_checkpoint_resumes_from_the_previous_one(
    interrupted, tokenized, tmp_path, capsys, file, corrupt, reason
):
    import shutil

    paths = tokenized.model_copy(
        update={"lm": tmp_path / "lm", "checkpoints": tmp_path / "ckpt", "plots": tmp_path / "plots"}
    )
    shutil.copytree(interrupted, paths.checkpoints)
    newest = paths.checkpoints / pretrain.CHECKPOINTS / "step-00000008"
    corrupt(newest / file)
    r = pretrain.run(tiny(max_steps=12, checkpoint_interval=4), paths)
    assert r.resumed_from_step == 4 and load_lm(paths.lm) is not None
    lines = [line for line in capsys.readouterr().out.splitlines() if "unusable" in line]
    assert len(lines) == 1 and lines[0].startswith(f"pretrain: checkpoint {newest} is unusable ({reason}")
    assert lines[0].endswith("); resuming from step-00000004")
    assert sorted(p.name for p in newest.parent.iterdir()) == [
        "step-00000008",
        "step-00000012",
    ]  # the broken one was rewritten


def test_no_usable_checkpoint_starts_from_scratch_and_says_so(interrupted, tokenized, tmp_path, capsys):
    import shutil

    paths = tokenized.model_copy(
        update={"lm": tmp_path / "lm", "checkpoints": tmp_path / "ckpt", "plots": tmp_path / "plots"}
    )
    shutil.copytree(interrupted, paths.checkpoints)
    folder = paths.checkpoints / pretrain.CHECKPOINTS
    truncate(folder / "step-00000008" / "model.safetensors")
    garbage(folder / "step-00000004" / "train_state.json")
    r = pretrain.run(tiny(max_steps=12, checkpoint_interval=4), paths)
    assert r.resumed_from_step == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "unusable" in line]
    assert len(lines) == 2 and "step-00000008 is unusable (model.safetensors: truncated" in lines[0]
    assert "step-00000004 is unusable (train_state.json: not valid JSON" in lines[1]
    assert lines[1].endswith("; no usable checkpoint, starting from scratch")


# --- a diverged run stops before it writes anything ---------------------------------------------


def nan_loss_at(bad_step: int):
    """`pretrain._step` whose loss turns nan at `bad_step` (the gradients stay finite)."""
    real = pretrain._step

    def step(s, cfg, rt, i):
        loss, grad_norm, lr = real(s, cfg, rt, i)
        return (loss * float("nan") if i == bad_step else loss), grad_norm, lr

    return step


def inf_grad_norm_at(bad_step: int):
    real = pretrain._step

    def step(s, cfg, rt, i):
        loss, grad_norm, lr = real(s, cfg, rt, i)
        return loss, (float("inf") if i == bad_step else grad_norm), lr

    return step


@pytest.mark.parametrize(
    "overrides,patch,message",
    [
        (
            {"lr": 1e30, "min_lr": 0.0},
            None,
            r"pretrain: (loss|gradient norm) is (nan|inf) at step \d+ \(lr [0-9.e+]+\): lower pretrain.lr",
        ),
        (
            {"lr": 1e30, "min_lr": 0.0, "grad_clip": 0.0},
            None,
            r"at step \d+ .*: lower pretrain.lr or set pretrain.grad_clip",
        ),
        ({}, nan_loss_at(4), r"pretrain: loss is nan at step 4 \(lr "),  # a log step
        (
            {"checkpoint_interval": 6, "log_interval": 4},
            nan_loss_at(5),
            r"pretrain: loss is nan at step 5 ",
        ),  # a checkpoint step
        ({}, inf_grad_norm_at(3), r"pretrain: gradient norm is inf at step 3 "),
    ],
    ids=["lr-1e30", "lr-1e30-no-clip", "nan-loss-logged", "nan-loss-before-checkpoint", "inf-grad-norm"],
)
def test_a_diverged_run_is_a_user_error_and_writes_nothing(tokenized, tmp_path, monkeypatch, overrides, patch, message):
    paths = tokenized.model_copy(
        update={"lm": tmp_path / "lm", "checkpoints": tmp_path / "ckpt", "plots": tmp_path / "plots"}
    )
    if patch is not None:
        monkeypatch.setattr(pretrain, "_step", patch)
    with pytest.raises(UserError, match=message) as e:
        pretrain.run(tiny(max_steps=12, **{"checkpoint_interval": 2, **overrides}), paths)
    bad_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert not paths.lm.exists() and not paths.plots.exists()
    saved = [int(p.name[5:]) for p in (paths.checkpoints / pretrain.CHECKPOINTS).glob("step-*")]
    assert all(s <= bad_step for s in saved), (saved, bad_step)  # step-N holds the weights after N steps (0..N-1)
