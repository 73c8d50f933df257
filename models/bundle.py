"""A servable model bundle: tokenizer + pretrained LM + classifier (float or int8), loaded without pickle.

Layout of a bundle folder:

    tokenizer.json      byte-level BPE (Hugging Face `tokenizers`)
    lm/                 pretrained language model (for /generate)
    classifier/         fine-tuned classifier (for /classify), float or int8
    manifest.json       size and sha256 of every file above, checked on load

The BentoML service, the MLflow pyfunc wrapper, the promotion smoke test and evaluation all load
models through this module, so what was evaluated is what is served. A broken bundle raises
`models.checkpoint.ArtifactError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import (
    CONFIG,
    ArtifactError,
    load_classifier,
    load_lm,
    read_config,
    verify_manifest,
    write_manifest,
)
from models.tokenizer import EOT, PAD, TOKENIZER_FILE, encode_texts, load_tokenizer


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]


class Bundle:
    """Tokenizer + classifier (+ optional LM) ready for inference."""

    def __init__(
        self, tokenizer, classifier: torch.nn.Module, labels: list[str], max_length: int, lm=None, variant: str = "fp32"
    ):
        self.tokenizer = tokenizer
        self.classifier = classifier.eval()
        self.labels = labels
        self.max_length = max_length
        self.lm = lm.eval() if lm is not None else None
        self.variant = variant
        self.pad_id = tokenizer.token_to_id(PAD)
        self.eot_id = tokenizer.token_to_id(EOT)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (N, T) and lengths (N,) of `texts`, as the classifier reads them."""
        return encode_texts(self.tokenizer, texts, self.max_length, self.pad_id)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K) of encoded texts."""
        return torch.softmax(self.classifier(ids, lengths).float(), dim=-1)

    def probabilities(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (N, K) in the order of `texts`: `encode` then `forward` over groups of at most
        `batch_size` texts of similar lengths (`length_groups`: a long text does not pad short ones to its length)."""
        out = torch.zeros(len(texts), len(self.labels))
        if not texts:
            return out
        ids, lengths = self.encode(texts)
        for rows in length_groups(lengths, batch_size):
            out[rows] = self.forward(ids[rows, : int(lengths[rows].max())], lengths[rows])
        return out

    def classify(self, texts: list[str]) -> list[Prediction]:
        probs = self.probabilities(texts)
        return [
            Prediction(self.labels[int(p.argmax())], {lab: round(float(v), 6) for lab, v in zip(self.labels, p)})
            for p in probs
        ]

    @property
    def can_generate(self) -> bool:
        """A causal LM is present (a masked-LM encoder cannot continue text)."""
        return self.lm is not None and self.lm.config.causal


FORWARD_OVERHEAD_TOKENS = 64
"""What one more forward pass costs, in padded tokens: the distilled classifier on the 2-core VM runs a text of about
120 tokens alone in 2.4 ms and in a batch of similar lengths in 1.5 ms, about 1 ms (~80 tokens) of fixed cost."""


def length_groups(lengths: torch.Tensor, max_size: int, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Row indices in forward-pass groups: sorted by length, a group closes at `max_size` rows or where padding its rows
    up to the next length would add more than `overhead` tokens (one more forward pass is then cheaper). Batches of 32
    test texts padded to their longest computed 3.8 times their real tokens; grouped, far less."""
    order = torch.argsort(lengths, stable=True)
    ordered = lengths[order].tolist()
    groups, start = [], 0
    for j in range(1, len(ordered)):
        if j - start >= max_size or (j - start) * (ordered[j] - ordered[j - 1]) > overhead:
            groups.append(order[start:j])
            start = j
    groups.append(order[start:])
    return groups


def _tokenizer(file: Path):
    try:
        return load_tokenizer(file)
    except FileNotFoundError:
        raise ArtifactError(file, "tokenizer not found") from None
    except Exception as e:  # the tokenizers library raises a bare Exception on a broken file
        raise ArtifactError(file, f"not a readable tokenizer ({' '.join(str(e).split())[:200]})") from None


def reading_like(lm, classifier):
    """A rotary LM made to read as far as the classifier's trunk does (its length, window and global tokens), so
    /generate reads a prompt as long as /classify reads a text. An LM with learned positions keeps its block size
    (a longer prompt keeps its last block_size tokens): tiled positions it was not trained on raised its next-token
    perplexity past position 128 from 64 to 127 (docs/long-context.md), where a rotary LM reading the whole prompt
    matched the context shift (52.4 vs 52.3)."""
    trunk = getattr(getattr(classifier, "config", None), "trunk", None)
    longer = trunk is not None and trunk.block_size > lm.config.block_size and trunk.attn_window
    if longer and lm.config.causal and lm.config.pos_encoding == "rope":
        lm.extend_positions(trunk.block_size, trunk.attn_window, trunk.attn_global, trunk.attn_chunked)
    return lm


def load_parts(tokenizer_file: Path, classifier_dir: Path, lm_dir: Path | None = None) -> Bundle:
    """A Bundle from its parts wherever they lie (stage outputs or a bundle folder)."""
    meta = read_config(classifier_dir)
    cfg = meta["config"]
    try:
        labels = list(cfg["labels"])
        max_length = int(meta["max_length"] if "max_length" in meta else cfg["trunk"]["block_size"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(Path(classifier_dir) / CONFIG, "no labels or max_length") from None
    classifier = load_classifier(classifier_dir)
    return Bundle(
        tokenizer=_tokenizer(Path(tokenizer_file)),
        classifier=classifier,
        labels=labels,
        max_length=max_length,
        lm=reading_like(load_lm(lm_dir), classifier) if lm_dir is not None else None,
        variant=str(meta.get("variant") or ("int8" if meta["kind"] == "classifier-int8" else "fp32")),
    )


def load_bundle(path: Path | str, with_lm: bool = True) -> Bundle:
    """Load a bundle folder (see the module docstring), after checking it against its manifest if it has one.

    Raises:
        ArtifactError: a file of the bundle is missing, truncated, corrupt or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(path, "no such bundle folder")
    verify_manifest(path)
    lm = path / "lm" if with_lm and (path / "lm").exists() else None
    return load_parts(path / TOKENIZER_FILE, path / "classifier", lm)


def write_bundle(folder: Path, tokenizer_file: Path, classifier_dir: Path, lm_dir: Path | None) -> None:
    """Copy the parts of a bundle into the empty or new `folder` and record them in its manifest
    (not atomic: the caller's temp folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tokenizer_file, folder / TOKENIZER_FILE)
    shutil.copytree(classifier_dir, folder / "classifier")
    if lm_dir is not None:
        shutil.copytree(lm_dir, folder / "lm", ignore=shutil.ignore_patterns("*.png", "history.json"))
    write_manifest(folder)
