"""align_train's `run` on a tiny pairs table: a tiny tokenizer and LM, a few epochs; the bundle it writes loads and
embeds, validation MRR is measured beside BM25's, and the loss is logged and falls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from models.checkpoint import save_lm
from models.dual_encoder import load_encoder
from models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, tiny
from tasks.align import train as align_train
from tasks.align.records import PAIRS_FILE
from tasks.shared.config.align_train import AlignTrainConfig
from tasks.shared.config.base import Paths
from tasks.shared.tracking import NullTracker

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VERBS = ["parse", "close", "open", "read", "write", "split", "join", "send", "load", "check"]
NOUNS = ["header", "socket", "file", "path", "line", "buffer", "message", "token", "record", "table"]


def pairs_table(n: int = 160, seed: int = 0) -> pd.DataFrame:
    """Docstring/code pairs whose name words say what the docstring says, in 8 modules; splits by module."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        verb, noun, module = rng.choice(VERBS), rng.choice(NOUNS), f"pkg.mod{i % 8}"
        text = f"{verb.capitalize()} the {noun} and return it."
        code = f"def {verb}_{noun}_{i}(self, {noun}):\n    return self.{verb}({noun})\n"
        split = "val" if i % 8 == 7 else "train"
        rows.append(
            {
                "id": f"{module}:{i}",
                "text": text,
                "query": text,
                "code": code,
                "qualname": f"{module}.{verb}_{noun}_{i}",
                "module": module,
                "source": f"pkg/mod{i % 8}.py",
                "split": split,
            }
        )
    return pd.DataFrame(rows)


def train_tokenizer(folder: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS)))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILE))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Paths:
    base = tmp_path_factory.mktemp("align")
    pairs = pairs_table()
    (base / "align_data").mkdir()
    pairs.to_parquet(base / "align_data" / PAIRS_FILE, index=False)
    train_tokenizer(base / "tokenizer", pairs["text"].tolist() + pairs["code"].tolist())
    torch.manual_seed(0)
    save_lm(GPT(tiny(vocab_size=load_tokenizer(base / "tokenizer").get_vocab_size(), block_size=32)), base / "lm")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    raw = {k: str(base / Path(v).name) for k, v in raw.items()}
    raw |= {"align_data": str(base / "align_data"), "tokenizer": str(base / "tokenizer"), "lm": str(base / "lm")}
    return Paths.model_validate(raw)


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.params: dict = {}
        self.tags: dict = {}

    def log_metrics(self, metrics, step=None) -> None:
        if "train_loss" in metrics:
            self.losses.append(metrics["train_loss"])

    def log_params(self, params) -> None:
        self.params |= params

    def set_tags(self, tags) -> None:
        self.tags |= tags


def test_run_trains_writes_a_loadable_bundle_and_measures_mrr_beside_bm25(project, monkeypatch):
    cfg = AlignTrainConfig(
        epochs=4,
        batch_size=16,
        max_text_length=16,
        max_code_length=24,
        dim=16,
        frozen_blocks=0,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_train_pairs=0,
        precision="fp32",
    )
    monkeypatch.setattr(align_train, "LOG_EVERY", 1)
    tracker = Recorder()
    result = align_train.run(cfg, project, tracker)
    m = result.metrics
    assert m["train_pairs"] == 140 and m["val_pairs"] == 20 and m["epochs_run"] == 4
    assert 0 < m["val_mrr"] <= 1 and 0 < m["val_bm25_mrr"] <= 1
    assert m["val_mrr"] == max(h["val_mrr"] for h in m["history"])  # the best epoch is the one kept
    assert np.isfinite(tracker.losses).all() and np.mean(tracker.losses[-5:]) < np.mean(tracker.losses[:5])
    assert tracker.tags["lmforge.precision"] == "fp32" and tracker.params["align_train.trunk_blocks"] >= 1
    encoder = load_encoder(project.align_model)
    assert json.loads((project.align_model / align_train.TRAIN_FILE).read_text())["val_mrr"] == m["val_mrr"]
    pairs = pd.read_parquet(project.align_data / PAIRS_FILE).query("split == 'val'")
    q, c = encoder.embed(pairs["query"].tolist(), "text"), encoder.embed(pairs["code"].tolist(), "code")
    assert align_train.mrr(align_train.ranks(q, c)) == pytest.approx(m["val_mrr"], abs=2e-3)  # what was saved
