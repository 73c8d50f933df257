"""align_evaluate's run on a tiny project: a tiny (untrained) dual encoder on disk, pairs and items from the
synthetic labeled functions, the index's meta; every output and metrics/align.json's keys."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import make_paths, tiny_labeled

from models.dual_encoder import DualEncoderConfig, DualEncoderNet, load_encoder, write_encoder
from models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE
from models.transformer import tiny
from tasks.align.evaluate import ALIGN_KEYS, RANKINGS, REPORT, align_metrics, run
from tasks.shared.config.align_evaluate import AlignEvaluateConfig
from tasks.shared.digest import tree_sha256

pytestmark = pytest.mark.integration


def align_tables(labeled: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pairs.parquet and items.parquet of the labeled functions: the docstring, and the code without it."""
    doc = labeled["text"].str.split('"""').str[1]
    code = labeled["text"].str.replace(r'\n\s*""".*?"""', "", regex=True)
    ids = labeled["source"] + ":" + labeled.groupby("source").cumcount().astype(str)
    pairs = pd.DataFrame({"id": ids, "text": doc, "query": doc, "code": code, "qualname": ids, "module": "m"})
    pairs = pairs.assign(source=labeled["source"], split=labeled["split"])
    items = pairs[["id", "code", "qualname", "source", "split"]].assign(line=1, snippet=code.str.split("\n").str[0])
    return pairs, items


def write_tiny_encoder(folder, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS)))
    folder.mkdir(parents=True)
    tok.save(str(folder.parent / TOKENIZER_FILE))
    torch.manual_seed(0)
    lm_config = tiny(vocab_size=tok.get_vocab_size(), block_size=64)
    write_encoder(folder, DualEncoderNet(DualEncoderConfig(lm_config, True, "mean", 16, 32, 64)), folder.parent)


def test_run_scores_every_system_and_writes_its_outputs(tmp_path):
    paths = make_paths(tmp_path)
    labeled = tiny_labeled().assign(id=lambda d: [f"r{i}" for i in range(len(d))])
    paths.clean_labeled.parent.mkdir(parents=True)
    labeled.to_parquet(paths.clean_labeled)
    pairs, items = align_tables(labeled)
    paths.align_data.mkdir(parents=True)
    pairs.to_parquet(paths.align_data / "pairs.parquet")
    items.to_parquet(paths.align_data / "items.parquet")
    write_tiny_encoder(paths.align_model, labeled["text"].tolist())
    version = load_encoder(paths.align_model).version
    paths.align_index.mkdir(parents=True)
    meta = {"encoder_version": version, "extra": {"index_recall_at_10": 0.99, "index_build_s": 0.01}}
    (paths.align_index / "index.json").write_text(json.dumps(meta))

    metrics = run(AlignEvaluateConfig(bootstrap_resamples=100, probe_train_rows=0), paths)

    out = align_metrics(metrics)
    assert {k.removesuffix("_ci95") for k in out} == set(ALIGN_KEYS)
    test = pairs[pairs["split"] == "test"]
    assert metrics["queries"] == len(test) and metrics["pool"] == len(test)
    assert metrics["encoder_sha256"] == tree_sha256(paths.align_model) and metrics["encoder_version"] == version
    assert metrics["index_recall_at_10"] == 0.99 and metrics["index_size_mb"] >= 0
    assert metrics["bm25_mrr"] > 0.5  # the synthetic docstrings repeat their function's words
    for p in ("", "code_to_text_", "bm25_", "hybrid_", "tfidf_", "int8_"):
        lo, hi = metrics[f"{p}mrr_ci95"]
        assert 0 <= lo <= metrics[f"{p}mrr"] <= hi <= 1
    assert (
        metrics["served_mode"] in ("dense", "bm25", "hybrid") and metrics["int8_size_mb"] < metrics["encoder_size_mb"]
    )
    assert metrics["served_mode_reason"].startswith(("best validation MRR", "no validation pairs"))
    assert metrics["zero_shot_accuracy"] is not None and metrics["linear_probe_accuracy"] is not None
    rankings = pd.read_parquet(paths.align_evaluation / RANKINGS)
    assert len(rankings) == 6 * len(test)
    assert rankings["gold_rank"].dropna().between(1, len(test)).all()
    assert "| bm25 |" in (paths.align_evaluation / REPORT).read_text()
