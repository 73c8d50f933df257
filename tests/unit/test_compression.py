"""Compression surgery (models/compression.py): what each method removes, exactly, and what it keeps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from models import checkpoint as ckpt
from models.classifier import ClassifierConfig, TransformerClassifier
from models.compression import (
    count_params,
    distillation_loss,
    keep_top,
    magnitude_masks,
    magnitude_prune,
    make_permanent,
    prune_structured,
    sparsity,
    student_from_teacher,
    student_layers,
    taylor_importance,
)
from models.transformer import GPTConfig, tiny

LABELS = ["a", "b", "c"]


@pytest.fixture
def model() -> TransformerClassifier:
    torch.manual_seed(0)
    return TransformerClassifier(
        ClassifierConfig(trunk=tiny(n_layer=3, n_head=4, n_embd=32, bias=True, vocab_size=100), labels=LABELS)
    ).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (4, 20), generator=g), torch.tensor([20, 11, 5, 1]), torch.tensor([0, 1, 2, 1])


def test_keeping_every_unit_reproduces_the_model_exactly(model, batch):
    ids, lengths, _ = batch
    full = prune_structured(model, [list(range(4))] * 3, [list(range(128))] * 3)
    assert_close(full(ids, lengths), model(ids, lengths))


def test_removing_a_head_and_a_channel_equals_zeroing_their_output_weights(model, batch):
    """Cutting head 1 and MLP channel 5 out of every block computes what the full model computes with
    those units' contributions to the residual stream set to zero."""
    ids, lengths, _ = batch
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for b in zeroed.trunk.blocks:
            b.attn.proj.weight[:, 8:16] = 0
            b.mlp.proj.weight[:, 5] = 0
    pruned = prune_structured(model, [[0, 2, 3]] * 3, [[c for c in range(128) if c != 5]] * 3)
    assert_close(pruned(ids, lengths), zeroed(ids, lengths), rtol=1e-5, atol=1e-5)
    assert pruned.config.trunk.layer_heads == [3, 3, 3] and pruned.config.trunk.layer_ffn == [127] * 3
    assert pruned.trunk.blocks[0].attn.qkv.weight.shape == (3 * 3 * 8, 32) and pruned.trunk.blocks[
        0
    ].mlp.fc.weight.shape == (127, 32)
    assert count_params(pruned) < count_params(model)


def test_a_pruned_model_saves_and_loads_with_its_per_block_shape(model, tmp_path, batch):
    ids, lengths, _ = batch
    pruned = prune_structured(model, [[0], [1, 3], [0, 1, 2]], [[1, 2], list(range(64)), [7]])
    ckpt.save_classifier(pruned, tmp_path / "p", extra={"max_length": 20})
    loaded = ckpt.load_classifier(tmp_path / "p")
    assert loaded.config.trunk.layer_heads == [1, 2, 3] and loaded.config.trunk.layer_ffn == [2, 64, 1]
    assert_close(loaded(ids, lengths), pruned(ids, lengths))


def test_per_block_shapes_are_validated():
    with pytest.raises(ValueError, match="layer_heads must list n_layer"):
        GPTConfig(n_layer=2, n_head=4, n_embd=32, layer_heads=[4])
    with pytest.raises(ValueError, match="layer_ffn"):
        GPTConfig(n_layer=1, n_head=4, n_embd=32, layer_ffn=[129])


def test_taylor_importance_scores_every_head_and_channel_and_keep_top_keeps_the_best(model, batch):
    heads, ffn = taylor_importance(model, [batch])
    assert [h.shape for h in heads] == [(4,)] * 3 and [f.shape for f in ffn] == [(128,)] * 3
    assert all((h >= 0).all() and h.sum() > 0 for h in heads)
    assert not any(p.grad is not None for p in model.parameters())  # gradients cleared, model back in eval mode
    assert not model.training
    keep = keep_top([torch.tensor([0.1, 0.9, 0.5, 0.2])], 0.5)
    assert keep == [[1, 2]]
    assert keep_top([torch.tensor([0.3, 0.1])], 0.99) == [[0]]  # one unit always stays


def test_magnitude_pruning_zeroes_the_globally_smallest_weights_permanently(model):
    sparse = magnitude_prune(model, 0.5)
    assert sparsity(model) == 0 and sparsity(sparse) == pytest.approx(0.5, abs=1e-3)
    weights = torch.cat(
        [
            m.weight.flatten()
            for n, m in sparse.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        ]
    )
    original = torch.cat(
        [
            m.weight.flatten()
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
        ]
    )
    kept = original[weights != 0].abs()
    assert kept.min() >= original[weights == 0].abs().max()  # global: smallest magnitudes gone, whatever the layer
    assert set(sparse.state_dict()) == set(model.state_dict())  # masks folded in: a plain model
    assert all(not hasattr(m, "weight_mask") for m in sparse.modules())


def test_masks_hold_the_zeros_while_training(model, batch):
    ids, lengths, y = batch
    masked = magnitude_masks(model, 0.6).train()
    opt = torch.optim.SGD(masked.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(masked(ids, lengths), y).backward()
        opt.step()
    final = make_permanent(masked)
    assert sparsity(final) == pytest.approx(0.6, abs=1e-3)


def test_student_layers_are_evenly_spaced_and_end_at_the_top():
    assert student_layers(4, 2) == [1, 3]
    assert student_layers(4, 1) == [3]
    assert student_layers(6, 3) == [1, 3, 5]
    assert student_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        student_layers(4, 5)


def test_student_starts_as_a_copy_of_teacher_blocks(model, batch):
    ids, lengths, _ = batch
    student, picked = student_from_teacher(model, 1)
    assert picked == [2] and student.config.trunk.n_layer == 1
    assert_close(student.trunk.blocks[0].state_dict(), model.trunk.blocks[2].state_dict())
    assert_close(student.head.weight, model.head.weight)
    same, _ = student_from_teacher(model, 3)
    assert_close(same.eval()(ids, lengths), model(ids, lengths))  # all blocks copied: the same function
    narrow, picked = student_from_teacher(model, 1, n_embd=16)
    assert picked == [] and narrow.config.trunk.n_embd == 16  # another width: fresh weights


def test_distillation_loss_mixes_soft_and_hard_targets():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert distillation_loss(s, t, y, temperature=2.0, alpha=0.0) == pytest.approx(float(F.cross_entropy(s, y)))
    assert float(distillation_loss(t, t, y, temperature=2.0, alpha=1.0)) == pytest.approx(
        0.0, abs=1e-6
    )  # student = teacher
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean")
    assert distillation_loss(s, t, y, temperature=3.0, alpha=1.0) == pytest.approx(9 * float(kl), rel=1e-5)


def test_a_switched_off_variant_leaves_a_marker_and_quantizing_it_is_refused(tmp_path):
    from conftest import TINY_FINETUNE, TINY_QUANTIZE, make_paths

    from tasks import distill, onnx, prune, quantize, sparsify
    from tasks.shared.config.distill import DistillConfig
    from tasks.shared.config.onnx import OnnxConfig
    from tasks.shared.config.prune import PruneConfig
    from tasks.shared.config.sparsify import SparsifyConfig
    from tasks.shared.errors import UserError
    from tasks.shared.variants import built, skipped

    paths = make_paths(tmp_path)
    assert not prune.run(PruneConfig(enabled=False), TINY_FINETUNE, paths).enabled
    sparsify.run(SparsifyConfig(enabled=False), TINY_FINETUNE, paths)
    distill.run(DistillConfig(enabled=False), TINY_FINETUNE, paths)
    assert built(paths) == {}
    assert skipped(paths) == {
        "pruned": "prune.enabled is false in params.yaml",
        "sparse": "sparsify.enabled is false in params.yaml",
        "distilled": "distill.enabled is false in params.yaml",
    }
    with pytest.raises(UserError, match=r"quantize.sources: pruned has no model .* switched off"):
        quantize.run(TINY_QUANTIZE.model_copy(update={"sources": ["pruned"]}), paths)
    quantize.run(TINY_QUANTIZE.model_copy(update={"sources": []}), paths)  # no int8 variant at all: an empty folder
    assert paths.quantized.is_dir() and not any(paths.quantized.iterdir())
    with pytest.raises(UserError, match=r"onnx.sources: pruned has no model"):
        onnx.run(OnnxConfig(sources=["pruned"]), paths)
    onnx.run(OnnxConfig(sources=[]), paths)
    assert paths.onnx.is_dir() and not any(paths.onnx.iterdir())
