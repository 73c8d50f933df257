"""tokenize: byte-level BPE round trip, EOT-joined id streams, and the on-disk token files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_TOKENIZE, tiny_corpus, tiny_labeled

from models.tokenizer import EOT, PAD, load_tokenizer
from tasks import tokenize
from tasks.shared.errors import UserError
from tasks.shared.io import write_json
from tasks.shared.shards import META_FILE, load_tokens

TEXTS = tiny_corpus(tiny_labeled())["text"].tolist()

ODD_STRINGS = [
    "plain ascii",
    "héllo wörld — “quotes” ½",
    "中文字符 日本語 한국어",
    "emoji 🚀🧪 and ZWJ 👩‍💻",
    "\x00\x01 control \x7f and \t tabs \r\n newlines\n\n",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return tokenize.train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)


def test_vocab_size_and_special_tokens(tok):
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text).ids
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [f"x = '{EOT}'", f"pad = '{PAD}'"])
def test_special_token_strings_in_text_are_ordinary_text(tok, text):
    """A document that merely contains the EOT/PAD strings must not gain a document boundary or padding."""
    ids = tok.encode(text).ids
    assert tok.token_to_id(EOT) not in ids and tok.token_to_id(PAD) not in ids
    assert tok.decode(ids) == text


def test_merges_compress_training_text(tok):
    text = TEXTS[0]
    assert len(tok.encode(text).ids) < len(text.encode("utf-8"))


def test_encode_stream_appends_eot_after_each_text(tok):
    texts = ["def f(): pass", "x = 1", "ünïcode"]
    ids = tokenize.encode_stream(tok, texts)
    assert ids.dtype == np.uint16
    eot = tok.token_to_id(EOT)
    expected = sum((tok.encode(t).ids + [eot] for t in texts), [])
    assert ids.tolist() == expected
    assert (ids == eot).sum() == len(texts) and ids[-1] == eot


def test_encode_stream_of_nothing_is_empty(tok):
    ids = tokenize.encode_stream(tok, [])
    assert ids.size == 0 and ids.dtype == np.uint16


def test_held_out_sources_fraction_and_bounds():
    sources = [f"s{i}" for i in range(40)]
    held = tokenize.held_out_sources(sources, 0.1, seed=3)
    assert len(held) == 4 and held <= set(sources)
    assert held == tokenize.held_out_sources(list(reversed(sources)), 0.1, seed=3)
    assert len(tokenize.held_out_sources(sources[:2], 0.01, seed=3)) == 1  # at least one
    assert len(tokenize.held_out_sources(sources[:2], 0.49, seed=3)) == 1  # never all


def _clean_corpus_project(paths, passed: bool = True):
    paths.clean_corpus.parent.mkdir(parents=True)
    tiny_corpus(tiny_labeled()).to_parquet(paths.clean_corpus, index=False)
    write_json(paths.validation, {"success": passed})


def test_run_writes_token_files_matching_meta(tiny_project):
    _clean_corpus_project(tiny_project)
    res = tokenize.run(TINY_TOKENIZE, tiny_project)

    meta = json.loads((tiny_project.tokens / META_FILE).read_text())
    train, val = load_tokens(tiny_project.tokens, "train"), load_tokens(tiny_project.tokens, "val")
    assert len(train) == meta["train_tokens"] == res.train_tokens > 0
    assert len(val) == meta["val_tokens"] == res.val_tokens > 0
    assert meta["vocab_size"] == res.vocab_size == 300 and meta["dtype"] == "uint16"
    assert int(train.max()) < meta["vocab_size"] and int(val.max()) < meta["vocab_size"]
    tok = load_tokenizer(tiny_project.tokenizer)
    assert meta["eot_id"] == tok.token_to_id(EOT) and meta["pad_id"] == tok.token_to_id(PAD)
    assert train[-1] == meta["eot_id"] and val[-1] == meta["eot_id"]
    assert res.chars_per_token > 1

    # every document is in exactly one split, whole
    corpus = tiny_corpus(tiny_labeled())
    n_docs = (np.asarray(train) == meta["eot_id"]).sum() + (np.asarray(val) == meta["eot_id"]).sum()
    assert n_docs == len(corpus)
    first_val_doc = tok.decode(val[: int(np.argmax(np.asarray(val) == meta["eot_id"]))].tolist())
    assert first_val_doc in set(corpus["text"])


def test_run_refuses_when_validation_failed(tiny_project):
    _clean_corpus_project(tiny_project, passed=False)
    with pytest.raises(UserError, match="validation failed"):
        tokenize.run(TINY_TOKENIZE, tiny_project)
    assert not tiny_project.tokens.exists() and not tiny_project.tokenizer.exists()
