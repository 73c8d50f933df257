"""Model surgery for compression: structured pruning, magnitude pruning and a distillation student.

Pure tensor code (no I/O, no tracking), used by the prune, sparsify and distill stages:

- `taylor_importance` scores every attention head and MLP channel of a `TransformerClassifier` by the
  first-order Taylor estimate of the loss change when it is removed, |sum(gradient x weight)| over its
  weights, accumulated over batches (Molchanov et al. 2019; Michel et al. 2019 for heads).
- `prune_structured` keeps the chosen heads and channels and builds a smaller model: the matrices
  shrink and `GPTConfig.layer_heads` / `layer_ffn` record the new shape, so it saves and loads like
  any classifier.
- `magnitude_prune` zeroes the globally smallest weights of every Linear with `torch.nn.utils.prune`
  and makes it permanent; the tensors stay dense, so dense kernels run no faster.
- `student_from_teacher` builds a shallower (and optionally narrower) classifier initialised from
  the teacher's layers where shapes allow; `distillation_loss` is Hinton et al.'s temperature-scaled
  KL to the teacher plus cross-entropy on the labels.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.classifier import ClassifierConfig, TransformerClassifier


def count_params(model: nn.Module) -> int:
    """Parameters counted once (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear that takes part in classification (the tied LM head does not)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over every classification Linear."""
    ws = [m.weight for m in linears(model).values()]
    return float(sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)))


def _head_rows(head: int, head_dim: int, inner: int) -> torch.Tensor:
    """Rows of the fused qkv weight that belong to `head` (its q, k and v slices)."""
    base = torch.arange(head * head_dim, (head + 1) * head_dim)
    return torch.cat([base, base + inner, base + 2 * inner])


def taylor_importance(
    model: TransformerClassifier, batches, loss_fn=None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block: importance of each attention head (H,) and each MLP channel (F,).

    `batches` yields (ids, lengths, y); the loss is cross-entropy unless `loss_fn(logits, y)` is given.
    """
    model = model.train()
    blocks = model.trunk.blocks
    heads = [torch.zeros(b.attn.n_head) for b in blocks]
    ffn = [torch.zeros(b.mlp.fc.out_features) for b in blocks]
    for ids, lengths, y in batches:
        model.zero_grad(set_to_none=True)
        logits = model(ids, lengths)
        (F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y)).backward()
        with torch.no_grad():
            for i, b in enumerate(blocks):
                a, m = b.attn, b.mlp
                qkv = (a.qkv.weight * a.qkv.weight.grad).sum(1)  # (3*inner,) per output row
                proj = (a.proj.weight * a.proj.weight.grad).sum(0)  # (inner,) per input column
                if a.qkv.bias is not None:
                    qkv = qkv + a.qkv.bias * a.qkv.bias.grad
                per_head = qkv.view(3, a.n_head, a.head_dim).sum((0, 2)) + proj.view(a.n_head, a.head_dim).sum(1)
                heads[i] += per_head.abs()
                fc = (m.fc.weight * m.fc.weight.grad).sum(1) + (m.proj.weight * m.proj.weight.grad).sum(0)
                if m.fc.bias is not None:
                    fc = fc + m.fc.bias * m.fc.bias.grad
                ffn[i] += fc.abs()
    model.zero_grad(set_to_none=True)
    model.eval()
    return heads, ffn


def keep_top(scores: list[torch.Tensor], fraction: float) -> list[list[int]]:
    """Per block, the indices (ascending) of the highest-scoring units after removing `fraction` of them
    (at least one kept)."""
    out = []
    for s in scores:
        keep = max(1, round(len(s) * (1 - fraction)))
        out.append(sorted(torch.topk(s, keep).indices.tolist()))
    return out


@torch.no_grad()
def prune_structured(
    model: TransformerClassifier, keep_heads: list[list[int]], keep_ffn: list[list[int]]
) -> TransformerClassifier:
    """A smaller copy of `model` with only the given heads and MLP channels of each block."""
    trunk_cfg = model.config.trunk
    new_trunk = replace(trunk_cfg, layer_heads=[len(h) for h in keep_heads], layer_ffn=[len(f) for f in keep_ffn])
    small = TransformerClassifier(
        ClassifierConfig(trunk=new_trunk, labels=list(model.config.labels), pooling=model.config.pooling)
    )
    src = model.state_dict()
    dst = small.state_dict()
    for name in dst:  # everything outside the blocks' attention and MLP matrices keeps its shape
        if src[name].shape == dst[name].shape:
            dst[name].copy_(src[name])
    for i, (heads, chans) in enumerate(zip(keep_heads, keep_ffn)):
        a, b = model.trunk.blocks[i], small.trunk.blocks[i]
        inner = a.attn.n_head * a.attn.head_dim
        rows = torch.cat(
            [_head_rows(h, a.attn.head_dim, inner).view(3, -1) for h in heads], dim=1
        ).flatten()  # q..., k..., v...
        cols = torch.cat([torch.arange(h * a.attn.head_dim, (h + 1) * a.attn.head_dim) for h in heads])
        chans = torch.tensor(chans)
        b.attn.qkv.weight.copy_(a.attn.qkv.weight[rows])
        b.attn.proj.weight.copy_(a.attn.proj.weight[:, cols])
        b.mlp.fc.weight.copy_(a.mlp.fc.weight[chans])
        b.mlp.proj.weight.copy_(a.mlp.proj.weight[:, chans])
        for lin_a, lin_b, idx in ((a.attn.qkv, b.attn.qkv, rows), (a.mlp.fc, b.mlp.fc, chans)):
            if lin_a.bias is not None:
                lin_b.bias.copy_(lin_a.bias[idx])
        for lin_a, lin_b in ((a.attn.proj, b.attn.proj), (a.mlp.proj, b.mlp.proj)):
            if lin_a.bias is not None:
                lin_b.bias.copy_(lin_a.bias)
    return small.eval()


@torch.no_grad()
def magnitude_masks(model: nn.Module, amount: float) -> nn.Module:
    """A copy of `model` whose classification-Linear weights carry `torch.nn.utils.prune` masks zeroing the
    globally smallest `amount` of them; the zeros hold while it trains. `make_permanent` drops the masks."""
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    targets = [(m, "weight") for m in linears(model).values()]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight (weight = weight_orig * mask) and remove the reparametrization."""
    from torch.nn.utils import prune

    for m in model.modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return model


def magnitude_prune(model: nn.Module, amount: float) -> nn.Module:
    """A copy of `model` with the globally smallest `amount` of classification-Linear weights set to zero,
    permanently."""
    return make_permanent(magnitude_masks(model, amount)).eval()


def student_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks a student copies, evenly spaced and ending with the top block
    (DistilBERT takes every other one)."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student layers must be in [1, {teacher_layers}], got {student_layers}")
    step = teacher_layers / student_layers
    return [round((i + 1) * step) - 1 for i in range(student_layers)]


@torch.no_grad()
def student_from_teacher(
    teacher: TransformerClassifier, n_layer: int, n_embd: int | None = None, n_head: int | None = None
) -> tuple[TransformerClassifier, list[int]]:
    """A classifier with `n_layer` blocks (and width `n_embd`), initialised from the teacher where shapes allow.

    Returns the student and the teacher blocks it copied (none when the width differs: then only the
    shape is shared and the weights start fresh).
    """
    t = teacher.config.trunk
    width = n_embd or t.n_embd
    trunk = replace(
        t,
        n_layer=n_layer,
        n_embd=width,
        n_head=n_head or (t.n_head if width == t.n_embd else max(1, width // t.head_dim)),
        layer_heads=[],
        layer_ffn=[],
    )
    student = TransformerClassifier(
        ClassifierConfig(trunk=trunk, labels=list(teacher.config.labels), pooling=teacher.config.pooling)
    )
    if width != t.n_embd or t.layer_heads or t.layer_ffn:
        return student.train(), []
    picked = student_layers(t.n_layer, n_layer)
    student.trunk.wte.load_state_dict(teacher.trunk.wte.state_dict())
    if teacher.trunk.wpe is not None:
        student.trunk.wpe.load_state_dict(teacher.trunk.wpe.state_dict())
    for i, j in enumerate(picked):
        student.trunk.blocks[i].load_state_dict(teacher.trunk.blocks[j].state_dict())
    student.trunk.ln_f.load_state_dict(teacher.trunk.ln_f.state_dict())
    student.head.load_state_dict(teacher.head.state_dict())
    return student.train(), picked


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y) (Hinton et al. 2015)."""
    T = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / T, -1),
        F.log_softmax(teacher_logits / T, -1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student_logits, y)
