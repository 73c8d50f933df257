"""tokenize: train a byte-level BPE tokenizer (Hugging Face `tokenizers`) and write token ids.

Corpus documents are split train/val by source file, encoded in Rust batches, joined with an
end-of-text token and stored as flat uint16 shards (`train-00000.bin`, ...) that training memory-maps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.bundle import EOT, MASK, PAD, load_tokenizer, text_only  # noqa: F401 (load_tokenizer re-exported)
from tasks.config import Paths, TokenizeConfig
from tasks.io import read_parquet
from tasks.tracking import Tracker, stage_main
from tasks.validate import require_passed

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
DTYPE = np.uint16


def train_tokenizer(texts, vocab_size: int, min_frequency: int):
    """Byte-level BPE trained on `texts`; no unknown tokens, round-trips any string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT, PAD, MASK],
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


def shard_files(folder: Path, split: str) -> list[Path]:
    """The token shards of `split` in order (`<split>-00000.bin`, ...; a single `<split>.bin` also reads)."""
    return sorted(Path(folder).glob(f"{split}-*.bin")) or [Path(folder) / f"{split}.bin"]


def load_tokens(path: Path, split: str) -> np.ndarray:
    """All token ids of `split` ('train' or 'val'), shards joined (memory-mapped when there is one)."""
    maps = [np.memmap(f, dtype=DTYPE, mode="r") for f in shard_files(path, split)]
    return maps[0] if len(maps) == 1 else np.concatenate(maps)


def write_shards(ids: np.ndarray, folder: Path, split: str, shard_tokens: int) -> list[str]:
    """Write `ids` as `<split>-00000.bin`, ... of at most `shard_tokens` ids each."""
    names = []
    for i, s in enumerate(range(0, max(1, ids.size), shard_tokens)):
        name = f"{split}-{i:05d}.bin"
        ids[s : s + shard_tokens].tofile(Path(folder) / name)
        names.append(name)
    return names


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


def run(cfg: TokenizeConfig, paths: Paths, tracker: Tracker | None = None) -> TokenizeResult:
    from models.checkpoint import write_dir_atomically

    require_passed(paths)
    corpus = read_parquet(paths.clean_corpus, ["text", "source"])
    val_sources = held_out_sources(corpus["source"].unique().tolist(), cfg.val_fraction, cfg.seed)
    is_val = corpus["source"].isin(val_sources)
    train_texts = corpus.loc[~is_val, "text"].tolist()
    val_texts = corpus.loc[is_val, "text"].tolist()
    if not val_texts:  # a corpus from one source: hold out its last document
        train_texts, val_texts = train_texts[:-1], train_texts[-1:]

    tok = train_tokenizer(train_texts, cfg.vocab_size, cfg.min_frequency)
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

    def fill_tokenizer(d: Path) -> None:
        tok.save(str(d / TOKENIZER_FILE))

    def fill_tokens(d: Path) -> None:
        meta["shards"] = {
            "train": write_shards(train_ids, d, "train", cfg.shard_tokens),
            "val": write_shards(val_ids, d, "val", cfg.shard_tokens),
        }
        (d / META_FILE).write_text(json.dumps(meta, indent=2))

    write_dir_atomically(paths.tokenizer, fill_tokenizer)
    write_dir_atomically(paths.tokens, fill_tokens)
    chars = sum(map(len, train_texts))
    return TokenizeResult(
        vocab_size=meta["vocab_size"],
        train_tokens=meta["train_tokens"],
        val_tokens=meta["val_tokens"],
        chars_per_token=round(chars / max(1, train_ids.size - len(train_texts)), 3),
    )


def main() -> None:
    stage_main("tokenize", lambda p, t: run(p.tokenize, p.paths, t).metrics)


if __name__ == "__main__":
    main()
