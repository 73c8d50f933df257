"""The tokenizer contract: file name, special tokens, loading, and encoding texts for a classifier.

The tokenize stage trains `tokenizer.json`; everything that reads text (training, evaluation, the
bundle the service loads) goes through this module, so special tokens mean the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"
"""Separates documents in the token stream; ends generation."""
PAD = "<pad>"
"""Right-padding of classifier batches."""
MASK = "<mask>"
"""Masked-LM target positions."""
SPECIAL_TOKENS = (EOT, PAD, MASK)
"""In this order they get ids 0, 1, 2."""
LONG_TOKENS = 128
"""A text of more tokens than this (untruncated, this tokenizer) is "long": the context every lmforge classifier
read before long documents (issue 27). evaluate scores long and short test rows apart (`macro_f1_long`,
`macro_f1_short`); finetune's `short` baseline reads at most this many tokens."""


def text_only(tok):
    """Make `tok` treat "<|endoftext|>"/"<pad>" inside text as ordinary characters.

    Document boundaries and padding are added as ids by our code, never parsed from text; otherwise
    a source file that mentions the EOT string would gain a spurious boundary.
    """
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: Path | str):
    """Load `tokenizer.json` (or the folder holding it) with special-token strings encoded as text."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: tokenizer not found")
    return text_only(Tokenizer.from_file(str(file)))


def encode_texts(tokenizer, texts: list[str], max_length: int, pad_id: int):
    """Right-padded ids (N, T) truncated to `max_length`, and real lengths (N,) (at least 1), as tensors."""
    import torch

    encs = tokenizer.encode_batch(list(texts))
    lengths = [max(1, min(len(e.ids), max_length)) for e in encs]
    T = max(lengths) if lengths else 1
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    for i, e in enumerate(encs):
        seq = e.ids[:max_length] or [pad_id]
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor(lengths, dtype=torch.long)


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Untruncated token count of each text (compare with LONG_TOKENS)."""
    return [len(e.ids) for e in tokenizer.encode_batch(list(texts))]
