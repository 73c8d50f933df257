"""kg_train: the knowledge-graph extractor on the pretrained trunk, and the baselines beside it.

One multitask fine-tune (models/extractor.py): every step reads a batch of train docs once through the trunk and
sums the tagging loss (BIO cross-entropy per token), the relation loss (cross-entropy per gold pair) and the linking
loss (cross-entropy over each ambiguous mention's candidates), weighted by the config, through the engine's one
training step (relation loss class-weighted: most pairs are `none`; the new heads at `head_lr_scale` times the
trunk's lr). The knowledge-base features (models/kb_features.py) come from the KB and the train docs' link counts
(leave-one-out for each training mention, so the prior is never its own answer). Candidate descriptions are read
once by the pretrained LM (frozen): only the linker's description projection learns, so the saved description
vectors are exactly what training compared against. After each epoch the validation docs are scored with the
inference code itself (models.extractor.Extractor) and the epoch with the best mean of entity F1, relation F1 and
linking accuracy is kept. The bundle and the fitted baselines go to `paths.kg_model`.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from models.checkpoint import load_lm
from models.extractor import (
    Encoded,
    Extractor,
    ExtractorConfig,
    ExtractorNet,
    bio_targets,
    description,
    encode,
    pooled_states,
    token_features,
    token_span,
    write_extractor,
)
from models.kb_features import KnowledgeIndex, Priors, candidate_name, relation_cues
from models.tokenizer import PAD, load_tokenizer
from tasks.kg.baselines import fit_baselines
from tasks.kg.examples import Doc, TaskData, load_task_data
from tasks.kg.predict import baseline_outputs, extractor_outputs
from tasks.kg.scoring import score_outputs, scores
from tasks.shared.classify import bucketed_batches
from tasks.shared.config.base import Paths
from tasks.shared.config.kg_train import KgTrainConfig
from tasks.shared.engine.optim import build_optimizer, lr_at, set_lr
from tasks.shared.engine.runtime import Runtime, device_name, probe_cpu_precision, setup_runtime
from tasks.shared.engine.step import Throughput, check_finite, train_step
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"kg_train": KgTrainConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
LOG_EVERY = 10
"""Steps between train-loss logs to the tracker."""
VAL_METRICS = ("entity_f1", "relation_f1", "linking_accuracy")
"""Their mean on the validation docs picks the best epoch."""


@dataclass
class Linker:
    """The knowledge base as the linker trains on it: its index (candidate rows by name, train priors), and the
    pretrained LM's pooled description state of every entity that shares its name (`rows`)."""

    kb: KnowledgeIndex
    rows: list[int]
    pooled: torch.Tensor
    """(len(rows), C)."""
    slot: dict[int, int]
    """Entity row -> position in `rows`."""


def link_priors(train: list[Doc]) -> Priors:
    """How often each surface string links to each entity in the train docs."""
    priors: Priors = {}
    for doc in train:
        for m in doc.mentions:
            if m.link:
                counts = priors.setdefault(doc.text[m.start : m.end].strip(), {})
                counts[m.link] = counts.get(m.link, 0) + 1
    return priors


def build_linker(data: TaskData, train: list[Doc], lm, tokenizer, cfg: KgTrainConfig) -> Linker:
    kb = KnowledgeIndex(data.entities.reset_index(drop=True), link_priors(train))
    rows = sorted(r for group in kb.by_name.values() if len(group) >= 2 for r in group)
    texts = [description(e) for e in kb.entities.iloc[rows].itertuples(index=False)]
    pooled = pooled_states(lm, tokenizer, texts, cfg.description_length)
    return Linker(kb, rows, pooled, {r: i for i, r in enumerate(rows)})


@dataclass
class Examples:
    """Train docs encoded once: ids/lengths (N, T), knowledge-base features (N, T, F), subject kinds (N,), tag
    targets (N, T) (-100 on pads), and flat lists of mention token spans (doc, first, end), relation pairs (head
    span or -1, tail span, doc, label) with their tails' cues, and linking examples (span, candidate slots, gold
    position, candidate features (K, F) with the example's own link left out of the prior)."""

    enc: Encoded
    features: torch.Tensor
    subject_kinds: torch.Tensor
    tags: torch.Tensor
    spans: list[tuple[int, int, int]]
    pairs: list[tuple[int, int, int, int]]
    cues: list[list[bool]]
    links: list[tuple[int, list[int], int, torch.Tensor]]


def _doc_examples(b: int, doc: Doc, offsets, ex: Examples, labels: tuple[dict, dict], linker: Linker) -> list[int]:
    """Append doc `b`'s spans, pairs and linking examples to `ex`; returns its tag targets."""
    entity_ids, relation_ids = labels
    kb, subject = linker.kb, linker.kb.subject(doc.owner)
    where = []
    for m in doc.mentions:
        tok = token_span(offsets, (m.start, m.end))
        where.append(None if tok is None else len(ex.spans))
        if tok is not None:
            ex.spans.append((b, *tok))
    for h, t, label in doc.pairs:
        if where[t] is not None and (h < 0 or where[h] is not None) and label in relation_ids:
            ex.pairs.append((-1 if h < 0 else where[h], where[t], b, relation_ids[label]))
            ex.cues.append(relation_cues(doc.text, (doc.mentions[t].start, doc.mentions[t].end)))
    for m, w in zip(doc.mentions, where):
        surface = doc.text[m.start : m.end]
        group = kb.by_name.get(candidate_name(surface), [])
        ids = [kb.ids[r] for r in group] if len(group) >= 2 else []
        if w is not None and m.link in ids:
            feats = torch.from_numpy(kb.link_features(surface, group, subject, held_out=m.link))
            ex.links.append((w, [linker.slot[r] for r in group], ids.index(m.link), feats))
    spans = [(m.start, m.end) for m in doc.mentions]
    return bio_targets(offsets, spans, [entity_ids.get(m.label, -1) for m in doc.mentions], len(offsets))


def build_examples(docs: list[Doc], tokenizer, cfg: KgTrainConfig, net_cfg: ExtractorConfig, linker) -> Examples:
    texts = [d.text for d in docs]
    enc = encode(tokenizer, texts, cfg.max_length, tokenizer.token_to_id(PAD))
    subjects = [linker.kb.subject(d.owner) for d in docs]
    features = token_features(linker.kb, texts, enc, subjects)
    kinds = torch.tensor([s.kind_id for s in subjects], dtype=torch.long)
    ex = Examples(enc, features, kinds, torch.full(enc.ids.shape, -100, dtype=torch.long), [], [], [], [])
    labels = (
        {k: i for i, k in enumerate(net_cfg.entity_labels)},
        {k: i for i, k in enumerate(net_cfg.relation_labels)},
    )
    for b, doc in enumerate(docs):
        tags = _doc_examples(b, doc, enc.offsets[b], ex, labels, linker)
        ex.tags[b, : len(tags)] = torch.tensor([max(t, 0) for t in tags], dtype=torch.long)
    if cfg.max_link_examples and len(ex.links) > cfg.max_link_examples:
        ex.links = random.Random(cfg.seed).sample(ex.links, cfg.max_link_examples)
    return ex


def multitask_loss(model: ExtractorNet, ex: Examples, linker: Linker, cfg: KgTrainConfig, device):
    """`loss_of` for `train_step`: a batch's doc indices -> weighted sum of the three losses."""
    spans = torch.tensor(ex.spans, dtype=torch.long).reshape(-1, 3)
    pairs = torch.tensor(ex.pairs, dtype=torch.long).reshape(-1, 4)
    cues = torch.tensor(ex.cues, dtype=torch.float32).reshape(len(pairs), -1)
    pooled = linker.pooled.to(device)
    weights = relation_weights(pairs[:, 3], len(model.config.relation_labels), cfg.relation_balance).to(device)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        n = ex.enc.lengths[rows]
        T = int(n.max())
        h = model(ex.enc.ids[rows, :T].to(device), n.to(device), ex.features[rows, :T].to(device))  # (B, T, C)
        loss = cfg.tag_weight * F.cross_entropy(
            model.tag_logits(h).flatten(0, 1).float(), ex.tags[rows, :T].flatten().to(device), ignore_index=-100
        )
        local = torch.full((len(ex.enc.lengths),), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        keep = local[spans[:, 0]] >= 0 if len(spans) else torch.zeros(0, dtype=torch.bool)
        if not keep.any():
            return loss
        span_rows = torch.full((len(spans),), -1, dtype=torch.long)
        span_rows[keep] = torch.arange(int(keep.sum()))
        batch_spans = torch.stack([local[spans[keep, 0]], spans[keep, 1], spans[keep, 2]], 1).to(device)
        feats = model.span_features(h, n.to(device), batch_spans)  # (S, 3C)
        subject = model.subject_vectors(model.text_means(h, n.to(device)), ex.subject_kinds[rows].to(device))
        loss = loss + _relation_loss(model, subject, feats, (pairs, cues), (local, span_rows), weights, cfg)
        return loss + _link_loss(model, feats, ex, span_rows, pooled, cfg, device)

    return loss_of


def relation_weights(labels: torch.Tensor, n: int, balance: float) -> torch.Tensor:
    """Class weights (n,) of the relation loss: (count of the class) ** -balance, mean 1 over the pairs (0: plain
    cross-entropy; 1: every class weighs as much as `none`, which is most pairs)."""
    counts = torch.bincount(labels, minlength=n).clamp(min=1).float()
    w = counts.pow(-balance)
    return w / (w[labels].mean() if len(labels) else 1.0)


def _relation_loss(model, subject, feats, examples: tuple, rows: tuple, weights, cfg) -> torch.Tensor:
    (pairs, cues), (local, span_rows) = examples, rows
    keep = local[pairs[:, 2]] >= 0 if len(pairs) else torch.zeros(0, dtype=torch.bool)
    mine, cues = pairs[keep], cues[keep]
    if not len(mine) or not cfg.relation_weight:
        return subject.new_zeros(())
    device, C = subject.device, subject.size(-1)
    head = torch.where(
        (mine[:, 0] < 0)[:, None].to(device),
        subject[local[mine[:, 2]].to(device)],
        feats[span_rows[mine[:, 0].clamp(min=0)].clamp(min=0).to(device), :C],
    )
    tail = feats[span_rows[mine[:, 1]].to(device)]
    logits = model.relation_logits(head, tail, cues.to(device)).float()
    return cfg.relation_weight * F.cross_entropy(logits, mine[:, 3].to(device), weight=weights)


def _link_loss(model, feats, ex: Examples, span_rows, pooled, cfg, device) -> torch.Tensor:
    mine = [(int(span_rows[s]), slots, gold, f) for s, slots, gold, f in ex.links if span_rows[s] >= 0]
    if not mine or not cfg.link_weight:
        return feats.new_zeros(())
    width = max(len(slots) for _, slots, _, _ in mine)
    slots = torch.tensor([s + [s[0]] * (width - len(s)) for _, s, _, _ in mine], dtype=torch.long, device=device)
    valid = torch.tensor([[i < len(s) for i in range(width)] for _, s, _, _ in mine], device=device)
    priors = torch.stack([F.pad(f, (0, 0, 0, width - len(f))) for *_, f in mine]).to(device)  # (L, K, F)
    ctx = model.context_vectors(feats[torch.tensor([r for r, *_ in mine], device=device)])  # (L, D)
    cands = model.describe(pooled[slots])  # (L, K, D)
    logits = model.link_logits(ctx, cands, priors).float().masked_fill(~valid, float("-inf"))
    gold = torch.tensor([g for _, _, g, _ in mine], dtype=torch.long, device=device)
    return cfg.link_weight * F.cross_entropy(logits, gold)


def in_memory_extractor(model: ExtractorNet, tokenizer, data: TaskData, linker: Linker, cfg) -> Extractor:
    """The model as the bundle would load it (same inference code), without writing it."""
    with torch.no_grad():
        vectors = {
            "vectors": model.describe(linker.pooled).float(),
            "rows": torch.tensor(linker.rows, dtype=torch.long),
        }
    return Extractor(model.to("cpu"), tokenizer, linker.kb, vectors, {"max_length": cfg.max_length}, "")


@dataclass
class KgTrainResult:
    train_docs: int
    val_docs: int
    train_mentions: int
    train_pairs: int
    train_links: int
    best_epoch: int
    epochs_run: int
    val: dict
    """Best epoch's validation entity_f1, relation_f1, linking_accuracy, linking_accuracy_all."""
    val_baseline: dict
    history: list[dict]
    train_seconds: float
    tokens_per_s: float
    description_seconds: float
    trainable_params: int
    device: str
    precision: str

    @property
    def metrics(self) -> dict:
        return asdict(self)


def freeze_trunk(model: ExtractorNet, blocks: int) -> None:
    """Keep the embeddings and the lowest `blocks` trunk blocks as pretrained (no-op for 0)."""
    if blocks <= 0:
        return
    trunk = model.trunk
    for module in (trunk.wte, trunk.wpe, *trunk.blocks[:blocks]):
        for p in module.parameters() if module is not None else ():
            p.requires_grad_(False)


def _sample(docs: list[Doc], cap: int, seed: int) -> list[Doc]:
    return docs if not cap or len(docs) <= cap else random.Random(seed).sample(docs, cap)


def run(cfg: KgTrainConfig, paths: Paths, tracker: Tracker | None = None) -> KgTrainResult:
    tracker = tracker or NullTracker()
    data = load_task_data(paths.kg_data)
    train, val = _sample(data.split("train"), cfg.max_train_docs, cfg.seed), data.split("val")
    val = _sample(val, cfg.max_val_docs, cfg.seed)
    if not train or not val:
        raise UserError(f"{paths.kg_data}: needs train and val docs (got {len(train)} and {len(val)})")
    lm, tokenizer = load_lm(paths.lm), load_tokenizer(paths.tokenizer)
    if cfg.max_length > lm.config.block_size:
        raise UserError(f"params.yaml: kg_train.max_length: {cfg.max_length} exceeds the LM block_size")
    net_cfg = ExtractorConfig(
        lm.config,
        data.entity_labels,
        data.relation_labels,
        cfg.link_dim,
        cfg.right_context,
        relation_heads=data.relation_heads,
    )
    torch.manual_seed(cfg.seed)
    model = ExtractorNet(net_cfg)
    model.trunk.load_state_dict(lm.state_dict())
    freeze_trunk(model, cfg.frozen_blocks)
    t0 = time.perf_counter()
    linker = build_linker(data, train, lm, tokenizer, cfg)
    described = time.perf_counter() - t0
    examples = build_examples(train, tokenizer, cfg, net_cfg, linker)
    baselines = fit_baselines(train, net_cfg.relation_labels)
    val_baseline = scores(score_outputs(baseline_outputs(baselines, val, data.entities), val, data.entities).counts)
    rt = setup_runtime(cfg)
    fitted = fit(model, examples, linker, cfg, rt, tracker, (tokenizer, data, val))
    with atomic_dir(paths.kg_model) as d:
        ex = in_memory_extractor(fitted.model, tokenizer, data, linker, cfg)
        extra = {"max_length": cfg.max_length, "train_config": cfg.model_dump(mode="json")}
        write_extractor(ex.model, d, paths.tokenizer, linker.kb, linker.pooled, linker.rows, extra)
        baselines.save(d)
        (d / "history.json").write_text(json.dumps(fitted.history))
    best = fitted.history[fitted.best_epoch - 1]
    return KgTrainResult(
        train_docs=len(train),
        val_docs=len(val),
        train_mentions=len(examples.spans),
        train_pairs=len(examples.pairs),
        train_links=len(examples.links),
        best_epoch=fitted.best_epoch,
        epochs_run=len(fitted.history),
        val={k: best[f"val_{k}"] for k in (*VAL_METRICS, "linking_accuracy_all")},
        val_baseline=val_baseline,
        history=fitted.history,
        train_seconds=round(fitted.seconds, 2),
        tokens_per_s=round(fitted.tokens_per_s, 1),
        description_seconds=round(described, 2),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        device=device_name(rt.device),
        precision=fitted.precision,
    )


@dataclass
class Fitted:
    model: ExtractorNet
    history: list[dict]
    best_epoch: int
    seconds: float
    tokens_per_s: float
    precision: str


def _validate(model, scoring: tuple, linker: Linker, cfg: KgTrainConfig, rt: Runtime) -> dict[str, float]:
    """Validation scores of `model` through the inference code (then back on the device, in training mode)."""
    tokenizer, data, val = scoring
    ex = in_memory_extractor(model, tokenizer, data, linker, cfg)
    with rt.autocast():
        out = extractor_outputs(ex, val, cfg.batch_size)
    model.to(rt.device).train()
    return {f"val_{k}": v for k, v in scores(score_outputs(out, val, data.entities).counts).items()}


def fit(model, ex: Examples, linker, cfg: KgTrainConfig, rt: Runtime, tracker: Tracker, scoring: tuple) -> Fitted:
    """Train for `cfg.epochs`, keep the epoch with the best mean validation score."""
    from tqdm import tqdm

    model.to(rt.device).train()
    loss_of = multitask_loss(model, ex, linker, cfg, rt.device)
    first = torch.arange(min(cfg.batch_size, len(ex.enc.lengths)))
    probe = probe_cpu_precision(rt, cfg.precision, model, lambda: loss_of(first), "kg_train")
    train_rt = rt.with_precision(probe.chosen)
    heads = {name: cfg.head_lr_scale for name, _ in model.named_parameters() if not name.startswith("trunk.")}
    opt = build_optimizer(model, cfg, rt.device, heads)
    total = math.ceil(len(ex.enc.lengths) / cfg.batch_size) * cfg.epochs
    gen, meter, history = torch.Generator().manual_seed(cfg.seed), Throughput(rt.device), []
    best, best_state, step, tps = -1.0, None, 0, None
    start = time.perf_counter()
    bar = tqdm(total=total, desc="kg_train", unit="step", dynamic_ncols=True)
    for epoch in range(1, cfg.epochs + 1):
        for rows in bucketed_batches(ex.enc.lengths, cfg.batch_size, gen):
            lr = lr_at(step, total, cfg)
            set_lr(opt, lr)
            loss, grad_norm = train_step(model, opt, train_rt, [rows], loss_of, cfg.grad_clip)
            value = loss.item()
            check_finite("kg_train", step, lr, train_rt, cfg.grad_clip, loss=value, grad_norm=grad_norm)
            meter.step(int(ex.enc.lengths[rows].sum()))
            if step % LOG_EVERY == 0:
                tps = meter.window_rate() or tps
                tracker.log_metrics({"train_loss": value, "lr": lr, **({"tokens_per_s": tps} if tps else {})}, step)
            bar.set_postfix(
                epoch=epoch, loss=f"{value:.3f}", **({"tok_s": f"{tps:,.0f}"} if tps else {}), refresh=False
            )
            bar.update()
            step += 1
        with meter.paused():
            scores_ = _validate(model, scoring, linker, cfg, rt)
            history.append({"epoch": epoch, **scores_})
            tracker.log_metrics(scores_, step)
            bar.write(f"kg_train epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores_.items()))
            mean = sum(scores_[f"val_{k}"] for k in VAL_METRICS) / len(VAL_METRICS)
            if mean > best:
                best, best_epoch = mean, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    bar.close()
    seconds = time.perf_counter() - start
    model.to("cpu").load_state_dict(best_state)
    return Fitted(model.eval(), history, best_epoch, seconds, meter.overall_rate() or 0.0, train_rt.precision)


def main() -> None:
    stage_main(
        "kg_train",
        lambda p, t: run(p.kg_train, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("kg_data",)),
    )


if __name__ == "__main__":
    main()
