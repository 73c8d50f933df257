"""encode_texts: padding and truncation done by `tokenizers` give the ids and lengths of the per-row Python loop."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_corpus, tiny_labeled

from models.tokenizer import EOT, PAD, encode_texts, token_counts
from tasks import tokenize

TEXTS = tiny_corpus(tiny_labeled())["text"].tolist()


@pytest.fixture(scope="module")
def tok():
    return tokenize.train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)


def loop_encode(tokenizer, texts: list[str], max_length: int, pad_id: int):
    """The reference: untruncated encodings cut and padded row by row in Python (encode_texts before issue 28)."""
    encs = tokenizer.encode_batch(list(texts))
    lengths = [max(1, min(len(e.ids), max_length)) for e in encs]
    ids = torch.full((len(encs), max(lengths) if lengths else 1), pad_id, dtype=torch.long)
    for i, e in enumerate(encs):
        seq = e.ids[:max_length] or [pad_id]
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor(lengths, dtype=torch.long)


CASES = [
    TEXTS[:32],
    ["", "a", "", "def " * 200, f"x {EOT} y {PAD}", "héllo 🚀"],
    ["", ""],
    ["only one short text"],
    [],
]


@pytest.mark.parametrize("texts", CASES, ids=["corpus", "mixed", "all-empty", "one", "none"])
@pytest.mark.parametrize("max_length", [1, 7, 64])
def test_encode_texts_equals_the_loop(tok, texts, max_length):
    pad_id = tok.token_to_id(PAD)
    ids, lengths = encode_texts(tok, texts, max_length, pad_id)
    want_ids, want_lengths = loop_encode(tok, texts, max_length, pad_id)
    assert ids.dtype == lengths.dtype == torch.long
    assert torch.equal(ids, want_ids) and torch.equal(lengths, want_lengths)


def test_the_callers_tokenizer_is_left_untruncated(tok):
    long = "def " * 200
    encode_texts(tok, [long], 8, tok.token_to_id(PAD))
    assert token_counts(tok, [long, ""]) == [len(tok.encode(long).ids), 0] and len(tok.encode(long).ids) > 8
    assert tok.encode(EOT).ids != [tok.token_to_id(EOT)]  # special-token strings still read as text


def test_length_groups_cover_every_row_once_and_keep_long_texts_apart():
    from models.bundle import length_groups

    lengths = torch.tensor([5, 500, 6, 7, 480, 5, 300, 8])
    groups = length_groups(lengths, max_size=3, overhead=64)
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    assert all(len(g) <= 3 for g in groups)
    assert [sorted(lengths[g].tolist()) for g in groups] == [[5, 5, 6], [7, 8], [300], [480, 500]]
    assert [g.tolist() for g in length_groups(torch.tensor([9]), 64)] == [[0]]
