"""tokenize: train a byte-level BPE tokenizer (Hugging Face `tokenizers`) and write token ids.

With `pretrain.init_from` (a Hugging Face GPT-2 folder) the stage trains nothing: it copies that checkpoint's
tokenizer (with `<pad>` and `<mask>` added, models/hf_files.py) and only encodes, so the ids fit the imported weights.
Corpus documents are split train/val by source file, encoded in Rust batches, joined with an
end-of-text token and stored as flat uint16 shards (`train-00000.bin`, ...) that training memory-maps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from models.errors import ArtifactError
from models.hf_files import read_gpt2_tokenizer
from models.tokenizer import EOT, MASK, PAD, SPECIAL_TOKENS, TOKENIZER_FILE, text_only
from tasks.shared.config.base import Paths
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.config.tokenize import TokenizeConfig
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.shards import DTYPE, META_FILE, write_shards
from tasks.shared.tracking import Tracker
from tasks.shared.validation import require_passed

SECTIONS = {"tokenize": TokenizeConfig, "pretrain": PretrainConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`, narrowed by NARROW_PARAMS)."""
NARROW_PARAMS = {"pretrain": ("init_from",)}
"""Of `pretrain` this stage reads only `init_from`: DVC reruns it for that key alone."""


def train_tokenizer(texts, vocab_size: int, min_frequency: int):
    """Byte-level BPE trained on `texts`; no unknown tokens, round-trips any string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return text_only(tok)


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts as one flat id array, each followed by the end-of-text id."""
    eot = tok.token_to_id(EOT)
    ids = [np.asarray(e.ids + [eot], dtype=DTYPE) for e in tok.encode_batch(texts)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=DTYPE)


def held_out_sources(sources: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the source files (at least one, never all when there are two or more)."""
    ranked = sorted(sources, key=lambda s: hashlib.sha1(f"tokenize:{seed}:{s}".encode()).hexdigest())
    n = min(max(1, round(fraction * len(ranked))), len(ranked) - 1)
    return set(ranked[:n])


@dataclass
class TokenizeResult:
    vocab_size: int
    train_tokens: int
    val_tokens: int
    chars_per_token: float

    @property
    def metrics(self) -> dict:
        return self.__dict__.copy()


def imported_tokenizer(folder: str):
    """The tokenizer of the Hugging Face checkpoint `pretrain.init_from` names, ready for lmforge."""
    tok = read_gpt2_tokenizer(folder)
    if tok.get_vocab_size() > np.iinfo(DTYPE).max + 1:
        raise ArtifactError(
            f"{folder}/{TOKENIZER_FILE}", f"{tok.get_vocab_size()} tokens do not fit {np.dtype(DTYPE).name} ids"
        )
    return tok


def run(cfg: TokenizeConfig, paths: Paths, tracker: Tracker | None = None, init_from: str = "") -> TokenizeResult:
    """Train a tokenizer on the training documents (or take `init_from`'s) and write both splits' ids."""
    require_passed(paths.validation)
    corpus = read_parquet(paths.clean_corpus, ["text", "source"])
    val_sources = held_out_sources(corpus["source"].unique().tolist(), cfg.val_fraction, cfg.seed)
    is_val = corpus["source"].isin(val_sources)
    train_texts = corpus.loc[~is_val, "text"].tolist()
    val_texts = corpus.loc[is_val, "text"].tolist()
    if not val_texts:  # a corpus from one source: hold out its last document
        train_texts, val_texts = train_texts[:-1], train_texts[-1:]

    tok = (
        imported_tokenizer(init_from) if init_from else train_tokenizer(train_texts, cfg.vocab_size, cfg.min_frequency)
    )
    train_ids, val_ids = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "eot_id": tok.token_to_id(EOT),
        "pad_id": tok.token_to_id(PAD),
        "mask_id": tok.token_to_id(MASK),
        "dtype": np.dtype(DTYPE).name,
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
    }

    with atomic_dir(paths.tokenizer) as d:
        tok.save(str(d / TOKENIZER_FILE))
    with atomic_dir(paths.tokens) as d:
        meta["shards"] = {
            "train": write_shards(train_ids, d, "train", cfg.shard_tokens),
            "val": write_shards(val_ids, d, "val", cfg.shard_tokens),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2))
    chars = sum(map(len, train_texts))
    return TokenizeResult(
        vocab_size=meta["vocab_size"],
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
        chars_per_token=round(chars / max(1, train_ids.size - len(train_texts)), 3),
    )


def main() -> None:
    stage_main("tokenize", lambda p, t: run(p.tokenize, p.paths, t, p.pretrain.init_from).metrics, SECTIONS)


if __name__ == "__main__":
    main()
