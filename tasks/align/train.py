"""align_train: the dual encoder (models/dual_encoder.py) on the pretrained trunk, by contrastive alignment.

Every step embeds a batch of (docstring, code) pairs with the text and code towers and takes CLIP's symmetric
InfoNCE at the learnable temperature through the engine's one training step: each pair's code is a negative of
every other text in the batch, and the reverse. Hard negatives come from the same module: batches are made of runs
of `module_group` pairs of one module (functions of one module share names and vocabulary, so telling them apart
is what retrieval in a file needs), and with `hard_negatives` each text also scores the code of another function of
its module as an extra negative. Both towers start from the pretrained LM; the lowest `frozen_blocks` blocks stay
as pretrained (time), the projections and the temperature learn at `head_lr_scale` times the trunk's rate.

After each epoch the validation pairs are scored with the inference code itself (models.dual_encoder.Encoder):
MRR of each pair's `query` (the docstring's first sentence, what evaluation searches with) over the pool of every
validation pair's code; the epoch with the best MRR is kept. BM25 (bm25s over models.search_index.lexical_tokens)
on the same queries and pool is recorded beside it (`val_bm25_mrr`): the bar the dense model has to reach. The
bundle goes to `paths.align_model`, with `train.json` (these metrics).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from models.checkpoint import load_lm
from models.dual_encoder import (
    DualEncoderConfig,
    DualEncoderNet,
    Encoder,
    clip_loss,
    encode,
    kind_tokenizer,
    write_encoder,
)
from models.search_index import lexical_tokens
from tasks.align.records import read_pairs
from tasks.shared.config.align_train import AlignTrainConfig
from tasks.shared.config.base import Paths
from tasks.shared.engine.optim import build_optimizer, lr_at, set_lr
from tasks.shared.engine.runtime import Runtime, device_name, probe_cpu_precision, setup_runtime
from tasks.shared.engine.step import Throughput, check_finite, train_step
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"align_train": AlignTrainConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
LOG_EVERY = 10
"""Steps between train-loss logs to the tracker."""
PROBE_FRACTION = 4
"""The precision probe times forward + backward on this fraction of a batch."""
TRAIN_FILE = "train.json"
"""What training measured, in the bundle."""


def _sample(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    return df if not cap or len(df) <= cap else df.sample(n=cap, random_state=seed)


@dataclass
class Tokens:
    """Texts of one kind tokenized once: right-padded ids (N, T) and the real tokens of each row (N,) (at least
    one: an empty text reads as one pad token, as in `encode`)."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, tokenizer, texts: list[str]) -> "Tokens":
        ids, mask = encode(tokenizer, texts)
        return cls(ids, mask.sum(1))

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask (B, T) of `rows`, padded to the longest of them only."""
        lengths = self.lengths[rows]
        longest = int(lengths.max())
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        return self.ids[rows, :longest], mask


@dataclass
class Pairs:
    """Training pairs as the loss reads them, tokenized once: the text and code tokens and the module index of each
    pair (N,)."""

    text: Tokens
    code: Tokens
    modules: np.ndarray

    @classmethod
    def of(cls, df: pd.DataFrame, tokenizers: dict) -> "Pairs":
        modules = np.asarray(pd.factorize(df["module"])[0], dtype=np.int64)
        text, code = (Tokens.of(tokenizers[kind], df[kind].tolist()) for kind in ("text", "code"))
        return cls(text, code, modules)


def module_batches(modules: np.ndarray, batch_size: int, group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of row indices in batches made of runs of up to `group` rows of one module, runs in random
    order (group 1 = plain random batches)."""
    order = rng.permutation(len(modules))
    runs = []
    for m in np.unique(modules):
        rows = order[modules[order] == m]
        runs += [rows[i : i + group] for i in range(0, len(rows), group)]
    flat = np.concatenate([runs[i] for i in rng.permutation(len(runs))]) if runs else order
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def module_partners(modules: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row another row of its module (a random row of any module for a module of one row)."""
    partners = rng.integers(0, len(modules), len(modules))
    for m in np.unique(modules):
        rows = np.flatnonzero(modules == m)
        if len(rows) > 1:  # a random other member: shift a random draw past the row itself
            k = rng.integers(0, len(rows) - 1, len(rows))
            partners[rows] = rows[(np.arange(len(rows)) + 1 + k) % len(rows)]
    return partners


def contrastive_loss(net: DualEncoderNet, pairs: Pairs, device):
    """`loss_of` for `train_step`: a batch (rows, hard-negative rows or None) -> symmetric InfoNCE."""

    def loss_of(batch: tuple[np.ndarray, np.ndarray | None]) -> torch.Tensor:
        rows, negs = batch
        codes = rows if negs is None else np.concatenate([rows, negs])
        t = net(*(x.to(device) for x in pairs.text.batch(rows)), "text")  # (B, dim)
        c = net(*(x.to(device) for x in pairs.code.batch(codes)), "code")  # (B [+ B], dim)
        return clip_loss(t, c[: len(rows)], net.scale(), None if negs is None else c[len(rows) :])

    return loss_of


def ranks(query_vectors: np.ndarray, pool_vectors: np.ndarray) -> np.ndarray:
    """1-based rank of pool row i among the whole pool for query i (ties counted in the query's favour)."""
    scores = query_vectors @ pool_vectors.T  # (n, n)
    return 1 + (scores > np.diag(scores)[:, None]).sum(1)


def bm25_ranks(queries: list[str], pool: list[str]) -> np.ndarray:
    """`ranks` of BM25 (bm25s over lexical_tokens) on the same queries and pool."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index([lexical_tokens(c) for c in pool], show_progress=False)
    scores = np.stack([retriever.get_scores(lexical_tokens(q)) for q in queries])
    return 1 + (scores > np.diag(scores)[:, None]).sum(1)


def mrr(rank: np.ndarray) -> float:
    return float(np.mean(1.0 / rank))


def freeze_trunks(net: DualEncoderNet, blocks: int) -> None:
    """Keep the embeddings and the lowest `blocks` blocks of every trunk as pretrained (no-op for 0)."""
    if blocks <= 0:
        return
    for trunk in net.trunks.values():
        for module in (trunk.wte, trunk.wpe, *trunk.blocks[:blocks]):
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(False)


@dataclass
class AlignTrainResult:
    train_pairs: int
    val_pairs: int
    best_epoch: int
    epochs_run: int
    val_mrr: float
    val_recall_at_1: float
    val_recall_at_10: float
    val_bm25_mrr: float
    """BM25 on the same validation queries and pool: the bar."""
    temperature: float
    """The learned temperature of the kept epoch."""
    history: list[dict]
    train_seconds: float
    tokens_per_s: float
    trainable_params: int
    device: str
    precision: str

    @property
    def metrics(self) -> dict:
        return asdict(self)


def run(cfg: AlignTrainConfig, paths: Paths, tracker: Tracker | None = None) -> AlignTrainResult:
    tracker = tracker or NullTracker()
    pairs = read_pairs(paths.align_data)
    train = _sample(pairs[pairs["split"] == "train"], cfg.max_train_pairs, cfg.seed)
    val = _sample(pairs[pairs["split"] == "val"], cfg.max_val_pairs, cfg.seed)
    if len(train) < 2 or len(val) < 2:
        raise UserError(f"{paths.align_data}: needs >= 2 train and val pairs (got {len(train)} and {len(val)})")
    lm = load_lm(paths.lm)
    try:
        net_cfg = DualEncoderConfig(
            lm.config, cfg.shared_trunk, cfg.pooling, cfg.dim, cfg.max_text_length, cfg.max_code_length
        )
    except ValueError as e:
        raise UserError(f"params.yaml: align_train: {e}") from None
    torch.manual_seed(cfg.seed)
    net = DualEncoderNet(net_cfg, cfg.temperature)
    net.load_trunks(lm)
    freeze_trunks(net, cfg.frozen_blocks)
    tracker.log_params({"align_train.trunk_blocks": lm.config.n_layer, "align_train.trunk_width": lm.config.n_embd})
    val_scoring = (val["query"].tolist(), val["code"].tolist(), paths.tokenizer)
    bm25 = mrr(bm25_ranks(val_scoring[0], val_scoring[1]))
    rt = setup_runtime(cfg)
    tokenizers = {kind: kind_tokenizer(paths.tokenizer, net_cfg.max_length(kind)) for kind in ("text", "code")}
    fitted = fit(net, Pairs.of(train, tokenizers), cfg, rt, tracker, val_scoring)
    best = fitted.history[fitted.best_epoch - 1]
    result = AlignTrainResult(
        train_pairs=len(train),
        val_pairs=len(val),
        best_epoch=fitted.best_epoch,
        epochs_run=len(fitted.history),
        val_mrr=best["val_mrr"],
        val_recall_at_1=best["val_recall_at_1"],
        val_recall_at_10=best["val_recall_at_10"],
        val_bm25_mrr=round(bm25, 4),
        temperature=round(1.0 / fitted.net.scale().item(), 4),
        history=fitted.history,
        train_seconds=round(fitted.seconds, 2),
        tokens_per_s=round(fitted.tokens_per_s, 1),
        trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        device=device_name(rt.device),
        precision=fitted.precision,
    )
    with atomic_dir(paths.align_model) as d:
        (d / TRAIN_FILE).write_text(json.dumps(result.metrics, indent=2))
        write_encoder(d, fitted.net, paths.tokenizer, {"train_config": cfg.model_dump(mode="json")})
    return result


@dataclass
class Fitted:
    net: DualEncoderNet
    history: list[dict]
    best_epoch: int
    seconds: float
    tokens_per_s: float
    precision: str


def validate(net: DualEncoderNet, scoring: tuple, rt: Runtime) -> dict[str, float]:
    """Validation MRR and recall@1/@10 of queries over the pool of their codes, through the inference code (then
    back in training mode)."""
    queries, pool, tokenizer = scoring
    encoder = Encoder(net, tokenizer, "")
    with rt.autocast():
        rank = ranks(encoder.embed(queries, "text"), encoder.embed(pool, "code"))
    net.train()
    return {
        "val_mrr": round(mrr(rank), 4),
        "val_recall_at_1": round(float(np.mean(rank <= 1)), 4),
        "val_recall_at_10": round(float(np.mean(rank <= 10)), 4),
    }


def _batches(pairs: Pairs, cfg: AlignTrainConfig, rng: np.random.Generator) -> list[tuple]:
    """One epoch of (rows, hard-negative rows or None)."""
    partners = module_partners(pairs.modules, rng) if cfg.hard_negatives else None
    return [
        (rows, None if partners is None else partners[rows])
        for rows in module_batches(pairs.modules, cfg.batch_size, cfg.module_group, rng)
        if len(rows) >= 2  # a one-pair batch has no negative
    ]


def fit(net: DualEncoderNet, pairs: Pairs, cfg: AlignTrainConfig, rt: Runtime, tracker: Tracker, scoring) -> Fitted:
    """Train for `cfg.epochs`, keep the epoch with the best validation MRR; `scoring` = validation (queries, pool,
    tokenizer file)."""
    from tqdm import tqdm

    net.to(rt.device).train()
    loss_of = contrastive_loss(net, pairs, rt.device)
    rng = np.random.default_rng(cfg.seed)
    rows, negs = _batches(pairs, cfg, rng)[0]
    few = max(2, len(rows) // PROBE_FRACTION)  # a part of a batch: the probe's 12 passes come out of the budget
    sample = (rows[:few], None if negs is None else negs[:few])
    probe = probe_cpu_precision(rt, cfg.precision, net, lambda: loss_of(sample), "align_train")
    train_rt = rt.with_precision(probe.chosen)
    tracker.set_tags({"lmforge.precision": probe.chosen, "lmforge.precision_probe": probe.reason[:250]})
    heads = {name: cfg.head_lr_scale for name, _ in net.named_parameters() if not name.startswith("trunks.")}
    opt = build_optimizer(net, cfg, rt.device, heads)
    total = math.ceil(len(pairs.modules) / cfg.batch_size) * cfg.epochs
    meter, history, best, best_state, step, tps = Throughput(rt.device), [], -1.0, None, 0, None
    start = time.perf_counter()
    bar = tqdm(total=total, desc="align_train", unit="step", dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        for batch in _batches(pairs, cfg, rng):
            lr = lr_at(step, total, cfg)
            set_lr(opt, lr)
            loss, grad_norm = train_step(net, opt, train_rt, [batch], loss_of, cfg.grad_clip)
            value = loss.item()
            check_finite("align_train", step, lr, train_rt, cfg.grad_clip, loss=value, grad_norm=grad_norm)
            meter.step(_tokens(batch, pairs))
            if step % LOG_EVERY == 0:
                tps = meter.window_rate() or tps
                logged = {"train_loss": value, "lr": lr, "temperature": 1.0 / net.scale().item()}
                tracker.log_metrics({**logged, **({"tokens_per_s": tps} if tps else {})}, step)
            bar.set_postfix(loss=f"{value:.3f}", **({"tok_s": f"{tps:,.0f}"} if tps else {}), refresh=False)
            bar.update()
            step += 1
        with meter.paused():
            scores = validate(net, scoring, rt)
            history.append({"epoch": epoch, **scores})
            tracker.log_metrics(scores, step)
            bar.write(f"align_train epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            if scores["val_mrr"] > best:
                best, best_epoch = scores["val_mrr"], epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    bar.close()
    seconds = time.perf_counter() - start
    net.to("cpu").load_state_dict(best_state)
    return Fitted(net.eval(), history, best_epoch, seconds, meter.overall_rate() or 0.0, train_rt.precision)


def _tokens(batch: tuple, pairs: Pairs) -> int:
    """Tokens the towers read for a batch (its texts, its codes and its hard negatives' codes)."""
    rows, negs = batch
    codes = rows if negs is None else np.concatenate([rows, negs])
    return int(pairs.text.lengths[rows].sum() + pairs.code.lengths[codes].sum())


def main() -> None:
    stage_main(
        "align_train",
        lambda p, t: run(p.align_train, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("align_data",)),
    )


if __name__ == "__main__":
    main()
