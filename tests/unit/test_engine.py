"""The training engine: schedules, optimizers, the one training step, accumulation, the precision probe, data
windows, masking, MFU, checkpoints."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, delete, flip_byte, garbage, truncate

from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, GPTConfig, tiny
from tasks.shared import classify
from tasks.shared.classify import Examples, fit
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.engine import runtime
from tasks.shared.engine import step as engine_step
from tasks.shared.engine.checkpoints import (
    TrainState,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from tasks.shared.engine.data import TokenShards, mlm_batch
from tasks.shared.engine.optim import build_optimizer, lr_at, set_lr
from tasks.shared.engine.runtime import Runtime, probe_cpu_precision, setup_runtime
from tasks.shared.engine.step import (
    check_finite,
    clip_and_step,
    lm_loss,
    mfu,
    peak_flops,
    step_throughput,
    time_steps,
    train_step,
)
from tasks.shared.errors import UserError
from tasks.shared.tracking import NullTracker


def cfg(**kw) -> PretrainConfig:
    return PretrainConfig(**{"deterministic": True, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 4, **kw})


@pytest.fixture
def rt():
    return setup_runtime(cfg())


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(vocab_size=64))


def batch(seed: int = 1, n: int = 8, T: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(64, (n, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_then_schedule(schedule):
    c = cfg(schedule=schedule)
    lrs = [lr_at(s, 100, c) for s in range(101)]
    assert lrs[0] == pytest.approx(c.lr / 4) and lrs[3] == pytest.approx(c.lr)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:4], lrs[1:4]))  # warmup rises
    if schedule == "constant":
        assert lrs[50] == lrs[100] == c.lr
    else:
        assert lrs[100] == pytest.approx(c.min_lr)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[4:], lrs[5:]))  # then never rises
    if schedule == "linear":
        assert lrs[52] == pytest.approx(c.min_lr + (c.lr - c.min_lr) * (1 - 48 / 96))
    if schedule == "cosine":
        assert lrs[52] == pytest.approx(c.min_lr + (c.lr - c.min_lr) * 0.5)


def test_layerwise_lr_scale_reaches_param_groups(rt):
    m = tiny_model()
    scale = {n: 0.5 for n, _ in m.named_parameters() if n.startswith("blocks.0.")}
    opt = build_optimizer(m, cfg(), rt.device, lr_scale=scale)
    set_lr(opt, 0.1)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(m.named_parameters())
    assert lrs[id(params["blocks.0.attn.qkv.weight"])] == pytest.approx(0.05)
    assert lrs[id(params["blocks.1.attn.qkv.weight"])] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices(rt):
    opt = build_optimizer(tiny_model(), cfg(weight_decay=0.1), rt.device)
    for g in opt.param_groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop"])
def test_every_optimizer_lowers_the_loss(name, rt):
    c = cfg(optimizer=name, lr={"adamw": 1e-2, "sgd": 0.3, "rmsprop": 1e-3}[name], min_lr=0)
    m = tiny_model()
    opt = build_optimizer(m, c, rt.device)
    assert type(opt).__name__.lower() == name
    x, y = batch()
    first = None
    for _ in range(30):
        loss = m(x, y)[1]
        first = first if first is not None else loss.item()
        loss.backward()
        clip_and_step(m, opt, rt, 1.0)
    assert m(x, y)[1].item() < first - 0.5


def test_gradient_clipping_bounds_the_update(rt):
    m = tiny_model()
    x, y = batch()
    (m(x, y)[1] * 1e4).backward()
    before = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    norm = clip_and_step(m, opt, rt, 1.0)
    assert norm == pytest.approx(float(before), rel=1e-5) and norm > 1.0


def test_gradient_accumulation_matches_one_big_batch():
    x, y = batch(n=8)
    grads = []
    for accum in (1, 4):
        m = tiny_model()
        micro = 8 // accum
        for i in range(accum):
            (m(x[i * micro : (i + 1) * micro], y[i * micro : (i + 1) * micro])[1] / accum).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_accumulation_steps_follow_from_the_batch_settings():
    assert cfg(batch_size=32, micro_batch_size=8).grad_accum == 4
    assert cfg(batch_size=32, micro_batch_size=8, distributed={"nproc": 2}).grad_accum == 2
    assert cfg(batch_size=32).grad_accum == 1
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        cfg(batch_size=30, micro_batch_size=8)


# --- the one training step -------------------------------------------------------------------


def lm_step(model, opt, rt, micro_batches, clip: float = 1.0):
    return train_step(model, opt, rt, micro_batches, lm_loss(model, rt.device, False), clip)


def twins(c: PretrainConfig, rt: Runtime):
    """Two identical tiny models with identical optimizers at the same lr."""
    models = [tiny_model(), tiny_model()]
    opts = [build_optimizer(m, c, rt.device) for m in models]
    for opt in opts:
        set_lr(opt, 1e-2)
    return models, opts


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, **tolerance) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tolerance)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_engine_step_is_exactly_the_hand_written_step(precision):
    """What pretrain's loop runs (`train_step` with the LM loss): forward and loss under autocast, backward,
    clip, optimizer step, zeroed gradients; three steps, so the optimizer state counts too."""
    c = cfg(precision=precision)
    rt = setup_runtime(c)
    (engine_model, hand_model), (engine_opt, hand_opt) = twins(c, rt)
    for seed in (1, 2, 3):
        x, y = batch(seed)
        loss, norm = lm_step(engine_model, engine_opt, rt, [(x, y)], c.grad_clip)
        with rt.autocast():
            hand_loss = hand_model(x, y)[1]
        hand_loss.backward()
        hand_norm = torch.nn.utils.clip_grad_norm_(hand_model.parameters(), c.grad_clip)
        hand_opt.step()
        hand_opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, hand_loss.detach(), rtol=0, atol=0)
        assert norm == float(hand_norm)
        assert_same_weights(engine_model, hand_model, rtol=0, atol=0)
        assert all(p.grad is None for p in engine_model.parameters())


def test_two_micro_batches_make_the_same_step_as_one_batch(rt):
    c = cfg()
    (whole, split), (whole_opt, split_opt) = twins(c, rt)
    x, y = batch(n=8)
    loss, norm = lm_step(whole, whole_opt, rt, [(x, y)])
    split_loss, split_norm = lm_step(split, split_opt, rt, [(x[:4], y[:4]), (x[4:], y[4:])])
    torch.testing.assert_close(split_loss, loss)  # the step's loss is the mean over its micro-batches
    assert split_norm == pytest.approx(norm, rel=1e-5)
    assert_same_weights(split, whole, rtol=1e-5, atol=1e-6)


def test_the_loss_scaler_scales_the_backward_and_decides_the_step():
    """fp16's path (a GradScaler; shown here with the CPU scaler on fp32): a finite scaled loss gives the
    unscaled step; an overflowing one is skipped and the scale backs off."""
    c = cfg()
    plain = setup_runtime(c)
    scaled = dataclasses.replace(plain, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    (a, b), (opt_a, opt_b) = twins(c, plain)
    x, y = batch()
    loss, norm = lm_step(a, opt_a, plain, [(x, y)])
    scaled_loss, scaled_norm = lm_step(b, opt_b, scaled, [(x, y)])
    torch.testing.assert_close(scaled_loss, loss)  # the unscaled loss is reported
    assert scaled_norm == pytest.approx(norm, rel=1e-5)  # the norm of the unscaled gradients
    assert_same_weights(a, b)

    overflow = dataclasses.replace(plain, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**127))
    before = [p.detach().clone() for p in b.parameters()]
    lm_step(b, opt_b, overflow, [(x, y)])
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))
    assert overflow.scaler.get_scale() == 2.0**126


def test_time_steps_times_only_the_steps_after_warmup():
    calls = []

    def step(i: int) -> None:
        calls.append(i)
        time.sleep(0.3 if i < 2 else 0.01)

    seconds = time_steps(step, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4]
    assert 0.03 <= seconds < 0.3


@pytest.fixture
def train_step_calls(monkeypatch):
    """Every call of the engine's `train_step`, from whichever module calls it: (number of micro-batches)."""
    calls: list[int] = []
    real = engine_step.train_step

    def spy(model, opt, rt, micro_batches, loss_of, grad_clip):
        calls.append(len(micro_batches))
        return real(model, opt, rt, micro_batches, loss_of, grad_clip)

    for module in (engine_step, classify):
        monkeypatch.setattr(module, "train_step", spy)
    return calls


def test_the_stage_benchmark_and_the_bench_step_through_train_step(train_step_calls):
    c = cfg()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    assert step_throughput(model, c, setup_runtime(c), batch=2, block=16, vocab=64, fused=False, steps=2, warmup=1) > 0
    assert train_step_calls == [1, 1, 1]

    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure("cpu-default", False, steps=1, warmup=1, fused_loss="auto", threads=None)
    assert train_step_calls == [1, 1, 1, 1, 1] and result["tokens_per_s"] > 0


def test_fit_steps_through_train_step(train_step_calls):
    torch.manual_seed(0)
    model = TransformerClassifier(ClassifierConfig(trunk=tiny(vocab_size=64), labels=["a", "b", "c"]))
    g = torch.Generator().manual_seed(0)
    data = Examples(
        torch.randint(64, (24, 12), generator=g), torch.randint(2, 13, (24,), generator=g), torch.arange(24) % 3
    )
    c = FinetuneConfig(batch_size=8, warmup_steps=0, seed=0)
    fit("t", model, c, data, data, 3, setup_runtime(c), NullTracker(), epochs=1)
    assert train_step_calls == [1, 1, 1]  # 24 rows in batches of 8


def test_runtime_is_a_value():
    rt = setup_runtime(cfg())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rt.amp_dtype = torch.bfloat16
    bf16 = rt.with_precision("bf16")
    assert (bf16.precision, rt.precision) == ("bf16", "fp32") and bf16.device == rt.device
    assert bf16.scaler is None and rt.with_precision("fp32") == rt


# --- numerics --------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu_trains():
    rt = setup_runtime(cfg(precision="bf16"))
    assert rt.amp_dtype is torch.bfloat16 and rt.scaler is None
    m = tiny_model()
    x, y = batch()
    with rt.autocast():
        logits, loss = m(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        setup_runtime(cfg(precision="fp16"))


def test_auto_precision_is_fp32_on_cpu(rt):
    assert rt.precision == "fp32" and rt.device.type == "cpu"


# --- data ------------------------------------------------------------------------------------


def write_shard(folder, name, ids):
    np.asarray(ids, dtype=np.uint16).tofile(folder / name)


def test_windows_come_from_one_shard_and_are_reproducible(tmp_path):
    write_shard(tmp_path, "train-00000.bin", np.arange(0, 100))
    write_shard(tmp_path, "train-00001.bin", np.arange(1000, 1050))
    data = TokenShards(tmp_path, "train")
    w = data.windows(500, 9, torch.Generator().manual_seed(0)).numpy()
    assert w.shape == (500, 9) and w.dtype == np.int64
    assert (np.diff(w, axis=1) == 1).all()  # consecutive ids: no window straddles two shards
    assert (w[:, 0] >= 1000).any() and (w[:, 0] < 1000).any()
    again = data.windows(500, 9, torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(w, again)


def test_single_file_layout_still_loads(tmp_path):
    write_shard(tmp_path, "val.bin", np.arange(40))
    assert len(TokenShards(tmp_path, "val")) == 40


def test_missing_shards_name_the_file(tmp_path):
    with pytest.raises(UserError, match="train.bin"):
        TokenShards(tmp_path, "train")


def test_mlm_masking(tmp_path):
    ids = np.tile(np.arange(4, 64), 200)
    ids[::7] = 0  # an end-of-text id every 7 tokens
    write_shard(tmp_path, "train-00000.bin", ids)
    data = TokenShards(tmp_path, "train")
    x, y = mlm_batch(data, 64, 32, torch.Generator().manual_seed(0), mask_id=2, vocab=64, prob=0.15, special=[0, 1])
    chosen = y != -1
    assert 0.12 < chosen.float().mean() < 0.18
    original = torch.where(chosen, y, x)
    assert not (chosen & (original == 0)).any()  # special tokens are never targets
    masked = (x == 2) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9
    assert (x[~chosen] != 2).all()  # unchosen positions are untouched


# --- throughput accounting -------------------------------------------------------------------


def test_flops_per_token_formula():
    m = GPT(tiny(vocab_size=64))
    c = m.config
    assert m.flops_per_token() == 6 * m.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


def test_mfu_uses_the_detected_gpu_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    assert peak_flops(gpu, "bf16") == 989e12
    assert mfu(1e9, 494.5e3, gpu, "bf16") == pytest.approx(0.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert peak_flops(gpu, "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert mfu(1e9, 1e3, gpu, "bf16") is None


def test_mfu_is_not_applicable_on_cpu():
    assert mfu(1e9, 1e3, torch.device("cpu"), "fp32") is None


# --- checkpoints -----------------------------------------------------------------------------


def train_steps(m, opt, rt, gen, steps):
    losses = []
    for _ in range(steps):
        x = torch.randint(64, (4, 17), generator=gen)
        loss = m(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        clip_and_step(m, opt, rt, 1.0)
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_is_bit_exact(tmp_path, rt):
    c = cfg()
    m, gen = tiny_model(), torch.Generator().manual_seed(3)
    opt = build_optimizer(m, c, rt.device)
    train_steps(m, opt, rt, gen, 3)
    save_checkpoint(tmp_path, TrainState(3, "fp", [{"step": 2}]), m, opt, rt, gen)
    reference = train_steps(m, opt, rt, gen, 4)

    m2, gen2 = tiny_model(seed=99), torch.Generator()
    opt2 = build_optimizer(m2, c, rt.device)
    found, unusable = latest_checkpoint(tmp_path, "fp")
    assert unusable == [] and found.step == 3
    state = restore_checkpoint(found, m2, opt2, rt, gen2)
    assert state.step == 3 and state.history == [{"step": 2}]
    assert m2.lm_head.weight is m2.wte.weight  # weight tying survives the round trip
    assert train_steps(m2, opt2, rt, gen2, 4) == reference
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)


def test_only_matching_checkpoints_resume_and_old_ones_are_pruned(tmp_path, rt):
    m, gen = tiny_model(), torch.Generator().manual_seed(3)
    opt = build_optimizer(m, cfg(), rt.device)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, TrainState(step, "a"), m, opt, rt, gen, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path, "a")[0].path.name == "step-00000003"
    assert latest_checkpoint(tmp_path, "b") == (None, [])
    (tmp_path / ".step-00000004.tmp").mkdir()  # an interrupted write is never a candidate
    assert latest_checkpoint(tmp_path, "a")[0].path.name == "step-00000003"


# (file of the newest checkpoint, what happens to it, the reason the resume names)
CORRUPTIONS = [
    ("model.safetensors", truncate, r"model.safetensors: truncated \(\d+ bytes, \d+ expected\)"),
    ("model.safetensors", flip_byte, r"model.safetensors: corrupt \(sha256 mismatch\)"),
    ("model.safetensors", delete, "model.safetensors: missing"),
    ("train_state.safetensors", truncate, "train_state.safetensors: truncated"),
    ("train_state.safetensors", flip_byte, "train_state.safetensors: corrupt"),
    ("train_state.json", garbage, "train_state.json: not valid JSON"),
    ("train_state.json", truncate, "train_state.json: not valid JSON"),
    ("train_state.json", delete, "train_state.json: missing"),
    ("manifest.json", garbage, "manifest.json: not valid JSON"),
]


def two_checkpoints(folder, rt):
    m, gen = tiny_model(), torch.Generator().manual_seed(3)
    opt = build_optimizer(m, cfg(), rt.device)
    for step in (1, 2):
        train_steps(m, opt, rt, gen, 1)
        save_checkpoint(folder, TrainState(step, "fp"), m, opt, rt, gen)
    return m, opt


@pytest.mark.parametrize("file,corrupt,reason", CORRUPTIONS, ids=[f"{f}-{c.__name__}" for f, c, _ in CORRUPTIONS])
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, rt, file, corrupt, reason):
    two_checkpoints(tmp_path, rt)
    corrupt(tmp_path / "step-00000002" / file)
    found, unusable = latest_checkpoint(tmp_path, "fp")
    assert found is not None and found.path.name == "step-00000001" and found.step == 1
    [(path, why)] = unusable
    assert path.name == "step-00000002" and re.fullmatch(reason + ".*", why), why
    m, gen = tiny_model(seed=5), torch.Generator()
    assert restore_checkpoint(found, m, build_optimizer(m, cfg(), rt.device), rt, gen).step == 1


@pytest.mark.parametrize(
    "file,corrupt,reason",
    [
        ("model.safetensors", truncate, "model.safetensors: not a readable safetensors file"),
        ("train_state.safetensors", delete, "train_state.safetensors: missing"),
        ("train_state.json", garbage, "train_state.json: not valid JSON"),
    ],
)
def test_checkpoints_without_a_manifest_are_still_checked_by_loading(tmp_path, rt, file, corrupt, reason):
    """Checkpoints written before manifests existed: what cannot be read is still caught, before the model changes."""
    two_checkpoints(tmp_path, rt)
    (tmp_path / "step-00000002" / "manifest.json").unlink()
    corrupt(tmp_path / "step-00000002" / file)
    found, [(path, why)] = latest_checkpoint(tmp_path, "fp")
    assert found.path.name == "step-00000001" and path.name == "step-00000002" and why.startswith(reason)


def test_no_usable_checkpoint_reports_each_one(tmp_path, rt):
    two_checkpoints(tmp_path, rt)
    truncate(tmp_path / "step-00000002" / "model.safetensors")
    delete(tmp_path / "step-00000001" / "train_state.safetensors")
    found, unusable = latest_checkpoint(tmp_path, "fp")
    assert found is None
    assert [(p.name, why.split(":")[0]) for p, why in unusable] == [
        ("step-00000002", "model.safetensors"),
        ("step-00000001", "train_state.safetensors"),
    ]


def test_load_checkpoint_raises_an_artifact_error_and_leaves_the_model_alone(tmp_path, rt):
    from models.checkpoint import ArtifactError

    two_checkpoints(tmp_path, rt)
    flip_byte(tmp_path / "step-00000002" / "train_state.safetensors")
    m = tiny_model(seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ArtifactError, match="train_state.safetensors: corrupt"):
        load_checkpoint(tmp_path / "step-00000002", m, build_optimizer(m, cfg(), rt.device), rt, torch.Generator())
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# --- diverged runs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"loss": 2.0, "grad_norm": 1.5}, None),
        ({"loss": None, "grad_norm": 0.3}, None),  # loss not read this step
        ({"loss": float("nan"), "grad_norm": 1.0}, "pretrain: loss is nan at step 7 (lr 0.01): lower pretrain.lr"),
        ({"loss": float("inf")}, "pretrain: loss is inf at step 7"),
        ({"grad_norm": float("nan")}, "pretrain: gradient norm is nan at step 7"),
        (
            {"grad_norm": float("inf"), "grad_clip": 0.0},
            "pretrain: gradient norm is inf at step 7 (lr 0.01): lower pretrain.lr or set pretrain.grad_clip",
        ),
        ({"loss": float("nan"), "lr": 1e30}, "(lr 1e+30)"),
        (
            {"loss": float("nan"), "run": "finetune cnn", "lr_key": "finetune.baseline_lr"},
            "finetune cnn: loss is nan at step 7 (lr 0.01): lower finetune.baseline_lr",
        ),
        (
            {"loss": float("nan"), "precision": torch.bfloat16, "grad_clip": 0.0},
            "lower pretrain.lr, set pretrain.grad_clip or use pretrain.precision: fp32",
        ),
        ({"grad_norm": float("inf"), "scaler": True}, None),  # fp16: the scaler skips overflowing steps
        ({"loss": float("nan"), "scaler": True, "precision": torch.float16}, "use pretrain.precision: fp32"),
    ],
)
def test_check_finite_stops_a_diverged_run_in_words(kw, message):
    kw = dict(kw)
    rt = Runtime(
        device=torch.device("cpu"),
        amp_dtype=kw.pop("precision", None),
        scaler=object() if kw.pop("scaler", False) else None,
    )
    run, lr, grad_clip = kw.pop("run", "pretrain"), kw.pop("lr", 0.01), kw.pop("grad_clip", 1.0)
    if message is None:
        check_finite(run, 7, lr, rt, grad_clip, **kw)
        return
    with pytest.raises(UserError) as e:
        check_finite(run, 7, lr, rt, grad_clip, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# precision: auto on CPU is timed per shape


def _probe_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))


def _timed_loss(monkeypatch, model, bf16_ms: float, fp32_ms: float):
    """A loss that takes exactly bf16_ms or fp32_ms on the probe's clock (a fake one: sleeping would give the
    test the machine's jitter, and 10 vs 10.5 ms is within it when the suite's workers share 2 cores)."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def loss():
        clock.now += (bf16_ms if torch.is_autocast_enabled("cpu") else fp32_ms) / 1000
        return model(torch.ones(4, 8)).sum()

    return loss


@pytest.mark.parametrize("bf16_ms,fp32_ms,chosen", [(1, 30, "bf16"), (30, 1, "fp32"), (10, 10.5, "fp32")])
def test_auto_precision_on_cpu_takes_bf16_only_where_it_is_measured_faster(monkeypatch, bf16_ms, fp32_ms, chosen):
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    cfg = PretrainConfig(precision="auto")
    rt = setup_runtime(cfg)
    model = _probe_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    before = dataclasses.replace(rt)
    probe = probe_cpu_precision(rt, "auto", model, _timed_loss(monkeypatch, model, bf16_ms, fp32_ms), "m")
    assert probe.chosen == chosen  # 10 vs 10.5 ms is under BF16_MIN_GAIN: fp32 stays
    assert rt == before and rt.precision == "fp32"  # the choice is returned; the runtime passed in is unchanged
    assert rt.with_precision(probe.chosen).precision == chosen
    assert (probe.fp32_s, probe.bf16_s) == pytest.approx(
        (fp32_ms / 1000, bf16_ms / 1000)
    ) and "median ratio" in probe.reason
    assert probe.metrics()["precision"] == chosen and probe.metrics()["precision_probe_bf16_ms"] == pytest.approx(
        bf16_ms
    )
    # the probe leaves no trace: same weights, no gradients, the same random stream (dropout drew from a fork)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_auto_precision_without_native_bf16_or_when_set_is_not_timed(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    model = _probe_model()
    never = lambda: pytest.fail("the model was run")  # noqa: E731
    rt = setup_runtime(PretrainConfig(precision="auto"))
    probe = probe_cpu_precision(rt, "auto", model, never, "m")
    assert (probe.chosen, rt.precision, probe.fp32_s) == ("fp32", "fp32", None) and "no native bf16" in probe.reason
    for precision in ("fp32", "bf16"):
        rt = setup_runtime(PretrainConfig(precision=precision))
        assert probe_cpu_precision(rt, precision, model, never, "m").chosen == precision == rt.precision


def test_auto_precision_replays_the_recorded_choice_without_timing(monkeypatch):
    """`lmforge verify` replays what the original run's probe chose, per model, instead of timing again."""
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    model = _probe_model()
    never = lambda: pytest.fail("the model was timed")  # noqa: E731
    rt = setup_runtime(PretrainConfig(precision="auto"))
    monkeypatch.setenv(runtime.PRECISION_REPLAY_ENV, '{"pretrain": "bf16", "cnn": "fp32"}')
    assert probe_cpu_precision(rt, "auto", model, never, "pretrain").chosen == "bf16"
    assert probe_cpu_precision(rt, "auto", model, never, "cnn").chosen == "fp32"
    assert probe_cpu_precision(rt, "fp32", model, never, "pretrain").chosen == "fp32"  # an explicit setting wins
    monkeypatch.setenv(runtime.PRECISION_REPLAY_ENV, '{"pretrain": "int4"}')
    with pytest.raises(UserError, match="pretrain: 'int4' is not one of"):
        probe_cpu_precision(rt, "auto", model, never, "pretrain")


def test_native_bf16_is_read_from_the_cpu_flags_the_kernel_lists(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not runtime.cpu_bf16_supported(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert runtime.cpu_bf16_supported(info)
    assert runtime.cpu_bf16_supported(tmp_path / "missing")  # not Linux: the probe times bf16 like anywhere else
