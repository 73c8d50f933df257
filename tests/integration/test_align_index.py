"""align_index end to end on tiny data with a real encoder bundle (models/dual_encoder.py, a tiny untrained one):
`run` loads it from paths.align_model, embeds the items, builds and saves the index, and the saved index answers
a query embedded by the same encoder's text tower in every mode."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import make_paths
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.dual_encoder import DualEncoderConfig, DualEncoderNet, load_encoder, write_encoder
from models.search_index import SearchIndex
from models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, tiny
from tasks.align import index as stage
from tasks.shared.config.align_index import AlignIndexConfig

pytestmark = pytest.mark.integration

CODES = [f"def {verb}_{noun}(path):\n    return {noun}.{verb}(path)" for verb in ("read", "write", "parse", "close")
         for noun in ("file", "socket", "header", "record", "stream")]  # fmt: skip


def tiny_bundle(folder, base):
    """A tiny tokenizer and LM, and an untrained dual encoder on it, written as an align_model bundle."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CODES, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS)))
    tok.save(str(base / TOKENIZER_FILE))
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=load_tokenizer(base / TOKENIZER_FILE).get_vocab_size(), block_size=32))
    net = DualEncoderNet(DualEncoderConfig(lm.config, True, "mean", 16, 16, 24))
    net.load_trunks(lm)
    folder.mkdir(parents=True)
    write_encoder(folder, net.eval(), base / TOKENIZER_FILE)


def test_the_stage_indexes_items_with_the_encoder_bundle_and_the_index_answers_its_queries(tmp_path):
    paths = make_paths(tmp_path)
    tiny_bundle(paths.align_model, tmp_path)
    paths.align_data.mkdir(parents=True)
    names = [c.split("(")[0].removeprefix("def ") for c in CODES]
    items = pd.DataFrame(
        {
            "id": [f"m.py#{n}" for n in names],
            "code": CODES,
            "qualname": [f"m.{n}" for n in names],
            "source": "m.py",
            "line": range(1, len(CODES) + 1),
            "snippet": [c.splitlines()[0] for c in CODES],
            "split": "test",
        }
    )
    items.to_parquet(paths.align_data / stage.ITEMS_FILE)
    pd.DataFrame({"query": ["Read a file.", "Close the socket."], "split": "test"}).to_parquet(
        paths.align_data / stage.PAIRS_FILE
    )
    metrics = stage.run(AlignIndexConfig(batch_size=8), paths).metrics
    encoder = load_encoder(paths.align_model)
    assert metrics["items"] == len(CODES) and metrics["dim"] == 16 and metrics["encoder_version"] == encoder.version
    assert metrics["index_recall_at_10"] >= 0.98
    index = SearchIndex.load(paths.align_index)
    assert index.encoder_version == encoder.version and index.meta["extra"]["embed_s"] == metrics["embed_s"]
    qvec = encoder.embed(["read a file"], "text")
    assert index.search("read a file", None, 3, "bm25")[0]["qualname"] == "m.read_file"
    assert len(index.search("read a file", qvec, 5, "dense")) == 5
    hybrid = index.search("read a file", qvec, 5, "hybrid")
    assert len(hybrid) == 5 and "m.read_file" in [h["qualname"] for h in hybrid]
