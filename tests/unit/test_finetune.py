"""Fine-tuning options: freezing, layer-wise learning rates, class weights, early stopping, baselines."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, SEED, TINY_FINETUNE
from torch.testing import assert_close

from models import checkpoint as ckpt
from models.baselines import CNNClassifier, GRUClassifier
from models.classifier import ClassifierConfig, TransformerClassifier
from models.tokenizer import LONG_TOKENS
from models.transformer import tiny
from tasks import finetune
from tasks.shared import classifiers, classify
from tasks.shared.classify import EarlyStopping, Examples, balanced_class_weights, fit, predict
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.optim import build_optimizer, set_lr
from tasks.shared.engine.runtime import PrecisionProbe, setup_runtime
from tasks.shared.engine.step import clip_and_step
from tasks.shared.errors import UserError
from tasks.shared.tracking import Tracker

VOCAB = 64


def classifier(seed: int = 0, **trunk) -> TransformerClassifier:
    torch.manual_seed(seed)
    return TransformerClassifier(ClassifierConfig(trunk=tiny(vocab_size=VOCAB, **trunk), labels=LABELS))


def examples(n: int = 24, T: int = 12, seed: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    return Examples(
        torch.randint(VOCAB, (n, T), generator=g), torch.randint(2, T + 1, (n,), generator=g), torch.arange(n) % 3
    )


def one_step(model, cfg: FinetuneConfig, lr_scale=None) -> None:
    rt = setup_runtime(cfg)
    opt = build_optimizer(model, cfg, rt.device, lr_scale)
    data = examples()
    F.cross_entropy(model(data.ids, data.lengths), data.y).backward()
    clip_and_step(model, opt, rt, cfg.grad_clip)


# --- freezing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "freeze,frozen_prefixes",
    [
        ("none", ()),
        (0, ()),
        ("embeddings", ("trunk.wte.", "trunk.wpe.")),
        (1, ("trunk.wte.", "trunk.wpe.", "trunk.blocks.0.")),
        (2, ("trunk.wte.", "trunk.wpe.", "trunk.blocks.0.", "trunk.blocks.1.")),
        ("trunk", ("trunk.",)),
    ],
)
def test_frozen_parameters_stay_bit_identical_after_a_step(freeze, frozen_prefixes):
    model = classifier()
    frozen = classifiers.freeze_trunk(model, freeze)
    names = [n for n, _ in model.named_parameters()]
    assert frozen == [n for n in names if n.startswith(frozen_prefixes)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model, FinetuneConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, seed=SEED))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
            assert p.grad is None
    moved = [n for n, p in model.named_parameters() if n not in frozen and not torch.equal(p, before[n])]
    assert "head.weight" in moved and len(moved) == len(names) - len(frozen)


def test_freezing_more_blocks_than_the_trunk_has_is_a_user_error():
    with pytest.raises(UserError, match="finetune.freeze: 3 exceeds the LM's 2 blocks"):
        classifiers.freeze_trunk(classifier(), 3)


def test_rope_trunk_has_no_position_table_to_freeze():
    model = classifier(pos_encoding="rope")
    assert classifiers.freeze_trunk(model, "embeddings") == ["trunk.wte.weight"]


# --- layer-wise learning rates -----------------------------------------------------------------


def test_layer_lr_decay_scales_each_block_from_the_top():
    model = classifier()  # 2 blocks
    scales = classifiers.layer_lr_scales(model, 0.5)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    for name, s in scales.items():
        if name.startswith(("head.", "trunk.ln_f.")):
            assert s == 1.0, name
        elif name.startswith("trunk.blocks.1."):
            assert s == 0.5, name
        elif name.startswith("trunk.blocks.0."):
            assert s == 0.25, name
        else:
            assert name.startswith(("trunk.wte.", "trunk.wpe.")) and s == 0.125, name


def test_optimizer_groups_get_the_decayed_learning_rates():
    model = classifier()
    cfg = FinetuneConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0)
    scales = classifiers.layer_lr_scales(model, 0.5)
    opt = build_optimizer(model, cfg, torch.device("cpu"), scales)
    set_lr(opt, 4e-3)
    name_of = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(4e-3 * scales[name_of[id(p)]]), name_of[id(p)]
            seen.add(name_of[id(p)])
    assert seen == set(scales)
    assert {round(g["lr"], 9) for g in opt.param_groups} == {4e-3, 2e-3, 1e-3, 5e-4}


def test_layer_decay_and_freezing_combine():
    """Frozen parameters get no group at all; the rest keep their decayed lr."""
    model = classifier()
    classifiers.freeze_trunk(model, 1)
    opt = build_optimizer(model, FinetuneConfig(), torch.device("cpu"), classifiers.layer_lr_scales(model, 0.5))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, n
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 0.5}


# --- class weights -----------------------------------------------------------------------------


def test_balanced_class_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    w = balanced_class_weights(y, 3)
    assert_close(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    assert_close(w, torch.tensor(expected, dtype=torch.float32))


def test_balanced_weights_equalize_each_class_share_of_the_loss():
    y = torch.tensor([0] * 8 + [1] * 2)
    w = balanced_class_weights(y, 2)
    share = torch.stack([w[c] * (y == c).sum() for c in range(2)])
    assert_close(share[0], share[1])


# --- early stopping ----------------------------------------------------------------------------


def test_early_stopping_counts_epochs_without_improvement():
    stop = EarlyStopping(patience=2)
    assert [stop.update(s, e) or stop.stop for e, s in enumerate([0.2, 0.5, 0.5, 0.4], start=1)] == [
        True,
        True,
        False,
        True,
    ]
    assert stop.best_epoch == 2 and stop.best == 0.5
    never = EarlyStopping(patience=0)
    for e in range(1, 20):
        never.update(0.1, e)
    assert not never.stop


class Recorder(Tracker):
    def __init__(self) -> None:
        self.metrics: list[dict] = []
        self.at: dict[tuple[str, int | None], float] = {}
        self.figures: list[str] = []

    def log_figure(self, figure, name: str) -> None:
        self.figures.append(name)

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))
        self.at.update({(k, step): v for k, v in metrics.items()})


def test_fit_stops_after_patience_epochs_and_keeps_the_best(monkeypatch):
    """Scripted validation scores: best at epoch 2, then two epochs without a better one -> stop after 4."""
    model = classifier()
    scores = iter([0.3, 0.6, 0.55, 0.6, 0.9, 0.95])
    snapshots = []

    def scripted_f1(y_true, y_pred, n):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(classify, "macro_f1", scripted_f1)
    cfg = FinetuneConfig(lr=1e-2, warmup_steps=0, batch_size=8, patience=2, seed=SEED)
    tracker = Recorder()
    out = fit("t", model, cfg, examples(), examples(seed=1), 3, setup_runtime(cfg), tracker, epochs=6, prefix="t/")
    assert (out.epochs_run, out.best_epoch, out.val_macro_f1) == (4, 2, 0.6)
    assert [h["epoch"] for h in out.history] == [1, 2, 3, 4]
    for k, v in out.model.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k  # the weights of epoch 2, not of the last epoch
    assert not torch.equal(snapshots[1]["head.weight"], snapshots[3]["head.weight"])
    logged = {k for m in tracker.metrics for k in m}
    assert {"t/train_loss", "t/lr", "t/tokens_per_s", "t/val_macro_f1", "t/val_accuracy", "t/train_seconds"} <= logged


def test_fit_without_patience_runs_every_epoch(monkeypatch):
    scores = iter([0.5, 0.4, 0.3])
    monkeypatch.setattr(classify, "macro_f1", lambda *a: next(scores))
    cfg = FinetuneConfig(lr=1e-2, warmup_steps=0, batch_size=8, patience=0, seed=SEED)
    out = fit("t", classifier(), cfg, examples(), examples(seed=1), 3, setup_runtime(cfg), Recorder(), epochs=3)
    assert (out.epochs_run, out.best_epoch) == (3, 1)


def test_fit_trains_in_the_probed_precision_and_scores_in_the_callers(monkeypatch):
    """`precision: auto` may train a model in bf16; its validation scores stay in the caller's runtime (the
    configured precision), where prune, sparsify and distill score the model they started from."""
    trained_in, scored_in = set(), set()
    real_step, real_predict = classify.train_step, classify.predict

    def step(model, opt, rt, *a):
        trained_in.add(rt.precision)
        return real_step(model, opt, rt, *a)

    def predict(model, data, rt, *a):
        scored_in.add(rt.precision)
        return real_predict(model, data, rt, *a)

    monkeypatch.setattr(classify, "probe_cpu_precision", lambda rt, *a: PrecisionProbe("bf16", 0.2, 0.1, "timed"))
    monkeypatch.setattr(classify, "train_step", step)
    monkeypatch.setattr(classify, "predict", predict)
    cfg = FinetuneConfig(lr=1e-2, warmup_steps=0, batch_size=8, seed=SEED, precision="auto")
    rt = setup_runtime(cfg)
    before = dataclasses.replace(rt)
    out = fit("t", classifier(), cfg, examples(), examples(seed=1), 3, rt, Recorder(), epochs=2)
    assert (trained_in, scored_in, out.precision) == ({"bf16"}, {"fp32"}, "bf16")
    assert rt == before  # the caller's runtime is untouched for the next model
    assert classify.val_scores(out.model, examples(seed=1), 3, rt)["val_macro_f1"] == round(out.val_macro_f1, 4)


# --- the stage on the tiny project -------------------------------------------------------------


@pytest.fixture
def finetune_paths(tiny_pipeline, tmp_path):
    """The tiny pipeline's LM, tokenizer and data, with this test's own finetune outputs."""
    return tiny_pipeline.paths.model_copy(
        update={"classifier": tmp_path / "classifier", "baselines": tmp_path / "baselines", "plots": tmp_path / "plots"}
    )


def test_finetune_run_writes_classifier_requested_baselines_and_metrics(finetune_paths):
    cfg = TINY_FINETUNE.model_copy(
        update={
            "baselines": ["gru", "scratch", "cnn"],
            "freeze": 1,
            "layer_lr_decay": 0.8,
            "class_weights": "balanced",
            "epochs": 3,
            "baseline_epochs": 2,
            "baseline_lr": 2e-2,
        }
    )
    tracker = Recorder()
    result = finetune.run(cfg, finetune_paths, tracker)

    meta = ckpt.read_config(finetune_paths.classifier)
    assert meta["kind"] == "classifier" and meta["train_config"]["freeze"] == 1
    assert isinstance(ckpt.load_classifier(finetune_paths.classifier), TransformerClassifier)
    n_params = sum(p.numel() for p in ckpt.load_classifier(finetune_paths.classifier).parameters())
    assert 0 < result.trainable_params < n_params  # embeddings and block 0 were frozen

    folder = finetune_paths.baselines
    assert {p.name for p in folder.iterdir()} == {"gru", "scratch", "cnn", "summary.json", "validation_curves.png"}
    for name, kind, module_type in (
        ("cnn", "classifier-cnn", CNNClassifier),
        ("gru", "classifier-gru", GRUClassifier),
        ("scratch", "classifier", TransformerClassifier),
    ):
        meta = ckpt.read_config(folder / name)
        assert meta["kind"] == kind and meta["baseline"] == name
        assert meta["max_length"] == cfg.max_length and meta["config"]["labels"] == LABELS
        assert isinstance(ckpt.load_classifier(folder / name), module_type)
        assert len(json.loads((folder / name / "history.json").read_text())) == result.baselines[name]["epochs_run"]

    metrics = result.metrics
    assert set(metrics["baselines"]) == {"gru", "scratch", "cnn"}
    for _name, m in metrics["baselines"].items():
        assert set(m) == {
            "best_epoch",
            "epochs_run",
            "val_accuracy",
            "val_macro_f1",
            "train_seconds",
            "params",
            "precision",
        }
        assert 1 <= m["best_epoch"] <= m["epochs_run"]
        assert 0 <= m["val_macro_f1"] <= 1 and 0 <= m["val_accuracy"] <= 1 and m["train_seconds"] > 0
    # no patience: every epoch runs; scratch keeps the Transformer's recipe, cnn/gru take baseline_epochs
    assert metrics["epochs_run"] == metrics["baselines"]["scratch"]["epochs_run"] == cfg.epochs
    assert metrics["baselines"]["cnn"]["epochs_run"] == metrics["baselines"]["gru"]["epochs_run"] == cfg.baseline_epochs
    assert metrics["baselines"]["scratch"]["params"] == n_params  # scratch trains every layer
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == {n: {k: v for k, v in m.items() if k != "train_seconds"} for n, m in metrics["baselines"].items()}
    plot = (finetune_paths.plots / finetune.VALIDATION_PLOT).read_text().splitlines()
    assert plot[0] == "epoch,val_accuracy,val_macro_f1" and len(plot) == 1 + cfg.epochs

    assert tracker.figures == ["validation_curves.png"]
    logged = {k for m in tracker.metrics for k in m}
    for prefix in ("", "scratch/", "cnn/", "gru/"):
        assert {
            f"{prefix}{k}" for k in ("val_macro_f1", "val_accuracy", "train_loss", "tokens_per_s", "train_seconds")
        } <= logged
    # step 0 is the first warmup step: lr / warmup_steps of each model's peak lr
    assert tracker.at[("lr", 0)] == tracker.at[("scratch/lr", 0)] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert tracker.at[("cnn/lr", 0)] == tracker.at[("gru/lr", 0)] == pytest.approx(cfg.baseline_lr / cfg.warmup_steps)


def test_the_same_training_writes_the_same_folders(finetune_paths, tmp_path):
    """evaluate depends on both folders: nothing run-dependent (train_seconds) is written into them."""
    from tasks.shared.datasets import dvc_md5

    # fp32 pinned: under `auto` the precision probe's timings decide, and on a busy machine they flip between runs
    cfg = TINY_FINETUNE.model_copy(
        update={"baselines": ["cnn"], "epochs": 1, "deterministic": True, "precision": "fp32"}
    )
    digests = []
    for i in range(2):
        paths = finetune_paths.model_copy(update={"classifier": tmp_path / f"c{i}", "baselines": tmp_path / f"b{i}"})
        finetune.run(cfg, paths)
        digests.append((dvc_md5(paths.classifier), dvc_md5(paths.baselines)))
    assert digests[0] == digests[1]


def test_finetune_without_baselines_leaves_an_empty_summary(finetune_paths):
    cfg = TINY_FINETUNE.model_copy(update={"baselines": [], "epochs": 1})
    result = finetune.run(cfg, finetune_paths)
    assert result.baselines == {}
    assert sorted(p.name for p in finetune_paths.baselines.iterdir()) == ["summary.json", "validation_curves.png"]


@pytest.mark.parametrize(
    "update,msg",
    [
        ({"baselines": ["cnn", "cnn"]}, "each baseline at most once"),
        ({"baselines": ["lstm"]}, "baselines"),
        ({"freeze": -1}, "block count >= 0"),
        ({"freeze": "head"}, "freeze"),
        ({"layer_lr_decay": 0.0}, "layer_lr_decay"),
        ({"layer_lr_decay": 1.5}, "layer_lr_decay"),
        ({"class_weights": "inverse"}, "class_weights"),
        ({"cnn_kernel_sizes": [3, 0]}, "cnn_kernel_sizes"),
    ],
)
def test_bad_finetune_options_name_the_key(update, msg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=msg):
        FinetuneConfig(**update)


# --- a diverged run stops before it writes anything ---------------------------------------------


def nan_cross_entropy(bad_step: int):
    """`F` for finetune whose loss turns nan at `bad_step`."""
    from types import SimpleNamespace

    calls = iter(range(10**6))

    def cross_entropy(*a, **kw):
        loss = F.cross_entropy(*a, **kw)
        return loss * float("nan") if next(calls) == bad_step else loss

    return SimpleNamespace(cross_entropy=cross_entropy)


@pytest.mark.parametrize(
    "name,cfg_update,lr_key,patch,message",
    [
        (
            "finetune",
            {"lr": 1e30, "min_lr": 0.0},
            "finetune.lr",
            None,
            r"finetune: (loss|gradient norm) is (nan|inf) at step \d+ \(lr [0-9.e+]+\): lower finetune.lr",
        ),
        (
            "cnn",
            {"lr": 1e30, "min_lr": 0.0},
            "finetune.baseline_lr",
            None,
            r"finetune cnn: .* at step \d+ .*: lower finetune.baseline_lr",
        ),
        (
            "gru",
            {"lr": 1e30, "min_lr": 0.0, "grad_clip": 0.0},
            "finetune.lr",
            None,
            r"finetune gru: .*lower finetune.lr or set finetune.grad_clip",
        ),
        ("finetune", {}, "finetune.lr", nan_cross_entropy(4), r"finetune: loss is nan at step 4 \(lr "),
    ],
    ids=["lr-1e30", "baseline-lr-1e30", "no-clip", "nan-loss"],
)
def test_a_diverged_fit_is_a_user_error_naming_step_and_key(monkeypatch, name, cfg_update, lr_key, patch, message):
    if patch is not None:
        monkeypatch.setattr(classify, "F", patch)
    cfg = FinetuneConfig(**{"lr": 1e-2, "warmup_steps": 0, "batch_size": 4, "seed": SEED, **cfg_update})
    trunk = tiny(vocab_size=VOCAB)
    model = classifiers.baseline_model(name, cfg, trunk, LABELS) if name != "finetune" else classifier()
    with pytest.raises(UserError, match=message):
        fit(
            name,
            model,
            cfg,
            examples(),
            examples(seed=1),
            3,
            setup_runtime(cfg),
            Recorder(),
            epochs=3,
            lr_key=lr_key,
        )


def test_a_diverged_finetune_run_writes_no_classifier(finetune_paths):
    cfg = TINY_FINETUNE.model_copy(update={"lr": 1e30, "min_lr": 0.0, "baselines": [], "epochs": 1})
    with pytest.raises(UserError, match=r"finetune: .* at step \d+"):
        finetune.run(cfg, finetune_paths)
    assert not finetune_paths.classifier.exists() and not finetune_paths.baselines.exists()


def test_bucketed_batches_cover_every_row_once_in_batches_of_similar_length():
    from tasks.shared.classify import BUCKET_BATCHES, bucketed_batches

    lengths = torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))
    batches = bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert len(batches) == math.ceil(1000 / 8) and all(1 <= len(b) <= 8 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    # sorted within runs of BUCKET_BATCHES batches: far less padding than random batches of the same rows
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    random = sum(int(lengths[b].max()) * len(b) for b in torch.randperm(1000).split(8))
    assert padded < 0.8 * random and BUCKET_BATCHES > 1
    # seeded: the same generator state gives the same epoch, another gives another
    again = bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not all(
        torch.equal(a, b) for a, b in zip(batches, bucketed_batches(lengths, 8, torch.Generator().manual_seed(2)))
    )


def test_predict_returns_rows_in_input_order():
    data = examples(n=50, T=12)
    model = classifiers.baseline_model("cnn", FinetuneConfig(seed=SEED), tiny(vocab_size=VOCAB), LABELS)
    rt = setup_runtime(FinetuneConfig())
    got = predict(model, data, rt, batch_size=7)
    with torch.no_grad():
        model.eval()
        want = [
            int(model(data.ids[i : i + 1, : int(data.lengths[i])], data.lengths[i : i + 1]).argmax(-1))
            for i in range(50)
        ]
    assert got.tolist() == want


# --- the `short` baseline: the 128-token model ------------------------------------------------


def test_examples_cut_keeps_the_first_tokens_and_clamps_lengths():
    data = examples(n=6, T=200)
    data.lengths[:] = torch.tensor([1, 50, 128, 129, 150, 200])
    cut = data.cut(LONG_TOKENS)
    assert cut.ids.shape == (6, LONG_TOKENS) and torch.equal(cut.ids, data.ids[:, :LONG_TOKENS])
    assert cut.lengths.tolist() == [1, 50, 128, 128, 128, 128] and torch.equal(cut.y, data.y)
    assert torch.equal(examples(n=6, T=12).cut(LONG_TOKENS).ids, examples(n=6, T=12).ids)  # already short: as is


@pytest.mark.parametrize("max_length,reads", [(512, LONG_TOKENS), (2048, LONG_TOKENS), (32, 32)])
def test_the_short_baseline_is_finetunes_recipe_reading_at_most_128_tokens(max_length, reads):
    cfg = FinetuneConfig(max_length=max_length, freeze=1, layer_lr_decay=0.8, epochs=3, baseline_epochs=7)
    recipe, epochs, lr_key = classifiers.baseline_recipe("short", cfg)
    assert recipe.max_length == reads and epochs == cfg.epochs and lr_key == "finetune.lr"
    assert recipe.model_dump(exclude={"max_length"}) == cfg.model_dump(exclude={"max_length"})  # lr, freeze, decay
    assert classifiers.baseline_recipe("scratch", cfg)[0].max_length == max_length


def test_the_short_baseline_is_the_pretrained_classifier_with_its_freezing_and_layer_decay():
    from models.transformer import GPT

    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=VOCAB))
    cfg = FinetuneConfig(freeze=1, layer_lr_decay=0.8, seed=SEED)
    model, scales = classifiers.build_baseline("short", cfg, lm, LABELS)
    want, want_scales, _ = classifiers.pretrained_classifier(lm, LABELS, cfg)
    assert_close(model.state_dict(), want.state_dict(), rtol=0, atol=0)
    assert scales == want_scales and scales is not None
    assert not any(p.requires_grad for p in model.trunk.blocks[0].parameters()) and model.head.weight.requires_grad
    assert classifiers.build_baseline("cnn", cfg, lm, LABELS)[1] is None


@pytest.fixture
def long_paths(tiny_pipeline, tmp_path):
    """The tiny pipeline's tokenizer with an LM of block 256 and labeled texts four times as long (over 128 tokens)."""
    from models.transformer import GPT, GPTConfig

    base = tiny_pipeline.paths
    torch.manual_seed(SEED)
    lm = GPT(GPTConfig.from_dict({**ckpt.read_config(base.lm)["config"], "block_size": 256}))
    (tmp_path / "lm").mkdir()
    ckpt.write_lm(lm, tmp_path / "lm")
    labeled = pd.read_parquet(base.clean_labeled)
    labeled["text"] = [f"{t}\n\n{t}\n\n{t}\n\n{t}" for t in labeled["text"]]
    labeled.to_parquet(tmp_path / "labeled.parquet", index=False)
    return base.model_copy(
        update={
            "lm": tmp_path / "lm",
            "clean_labeled": tmp_path / "labeled.parquet",
            "classifier": tmp_path / "classifier",
            "baselines": tmp_path / "baselines",
            "plots": tmp_path / "plots",
        }
    )


def test_finetune_trains_and_writes_the_short_baseline_at_128_tokens(long_paths):
    from models.bundle import load_parts
    from models.tokenizer import TOKENIZER_FILE

    cfg = TINY_FINETUNE.model_copy(
        update={"max_length": 256, "baselines": ["short"], "epochs": 1, "deterministic": True, "precision": "fp32"}
    )
    result = finetune.run(cfg, long_paths)
    labels, train, val = classify.load_examples(cfg, long_paths, 256)
    assert int(train.lengths.max()) > LONG_TOKENS  # the cut matters on these rows

    assert ckpt.read_config(long_paths.classifier)["max_length"] == 256
    folder = long_paths.baselines / "short"
    meta = ckpt.read_config(folder)
    assert meta["max_length"] == LONG_TOKENS and meta["baseline"] == "short" and meta["kind"] == "classifier"
    bundle = load_parts(long_paths.tokenizer / TOKENIZER_FILE, folder)  # what evaluate and serving load
    ids, lengths = bundle.encode(pd.read_parquet(long_paths.clean_labeled)["text"].tolist()[:8])
    assert bundle.max_length == LONG_TOKENS and ids.shape[1] == LONG_TOKENS and int(lengths.max()) == LONG_TOKENS

    # the same model as the pretrained classifier trained by finetune's recipe on the rows cut to 128 tokens
    recipe, epochs, _ = classifiers.baseline_recipe("short", cfg)
    model, scales = classifiers.build_baseline("short", recipe, ckpt.load_lm(long_paths.lm), labels)
    rt = setup_runtime(recipe)
    want = fit(
        "short",
        model,
        recipe,
        train.cut(LONG_TOKENS),
        val.cut(LONG_TOKENS),
        len(labels),
        rt,
        Recorder(),
        epochs,
        scales,
    )
    assert_close(ckpt.load_classifier(folder).state_dict(), want.model.state_dict(), rtol=0, atol=0)
    assert result.baselines["short"]["val_macro_f1"] == pytest.approx(want.val_macro_f1, abs=1e-4)


def test_finetune_reads_past_the_lms_block_size_with_sparse_attention(long_paths, tiny_pipeline):
    from models.bundle import load_parts
    from models.tokenizer import TOKENIZER_FILE

    paths = long_paths.model_copy(update={"lm": tiny_pipeline.paths.lm})
    lm = ckpt.load_lm(paths.lm)
    block = lm.config.block_size
    cfg = TINY_FINETUNE.model_copy(
        update={"max_length": 3 * block, "baselines": [], "epochs": 1, "deterministic": True, "precision": "fp32"}
    )
    finetune.run(cfg, paths)
    trunk = ckpt.read_config(paths.classifier)["config"]["trunk"]
    assert (trunk["block_size"], trunk["attn_window"], trunk["attn_global"], trunk["attn_chunked"]) == (
        3 * block,
        block,
        1,
        True,
    )
    model = ckpt.load_classifier(paths.classifier)
    if lm.wpe is not None:  # fine-tuned from the tiled copy: still a (3 * block)-row table
        assert model.trunk.wpe.weight.shape[0] == 3 * block
    bundle = load_parts(paths.tokenizer / TOKENIZER_FILE, paths.classifier, paths.lm)
    assert bundle.max_length == 3 * block
    # /generate reads as far with a rotary LM; learned positions keep the LM's block (tiling them hurt its perplexity)
    rotary = lm.config.pos_encoding == "rope"
    assert bundle.lm.config.block_size == (3 * block if rotary else block)
    assert bundle.lm.config.attn_window == (block if rotary else lm.config.attn_window)
    texts = pd.read_parquet(paths.clean_labeled)["text"].tolist()[:4]
    ids, lengths = bundle.encode(texts)
    assert int(lengths.max()) > 2 * block  # long enough for the blocked kernel
    probs = bundle.probabilities(texts)
    assert probs.shape == (4, len(bundle.labels)) and torch.allclose(probs.sum(1), torch.ones(4))
    prompt = torch.tensor([ids[0, : int(lengths[0])].tolist()])
    assert bundle.lm.generate(prompt, 3, temperature=0).shape[1] == prompt.shape[1] + 3


def test_a_rotary_lm_reads_as_far_as_its_classifier_and_a_learned_one_keeps_its_block():
    from models.bundle import reading_like
    from models.classifier import ClassifierConfig, TransformerClassifier
    from models.transformer import GPT, tiny

    for pos, block in (("rope", 64), ("learned", 16)):
        lm = GPT(tiny(vocab_size=64, block_size=16, pos_encoding=pos))
        trunk = tiny(vocab_size=64, block_size=64, pos_encoding=pos, attn_window=16, attn_global=1)
        out = reading_like(lm, TransformerClassifier(ClassifierConfig(trunk=trunk, labels=["a", "b"])))
        assert out.config.block_size == block
        prompt = torch.randint(0, 64, (1, 40))
        assert out.generate(prompt, 2, temperature=0).shape == (1, 42)  # learned: the context shift
