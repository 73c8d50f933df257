"""The dual encoder of the alignment task: text and code towers on the pretrained GPT trunk, one embedding space.

Each tower is the trunk (shared by both kinds, or one copy per kind), a pooling step over the real (non-pad)
tokens and a linear projection to `dim`, L2-normalised, so a dot product is a cosine. The trunk is causal: `mean`
pooling averages every token's state, `last` takes the state of the last real token (the only one that has read
the whole text), `mean_lexical` puts the mean of the input token embeddings beside `mean` (the projection reads
both: a lexical path). Training (tasks/align/train.py) compares the towers with CLIP's symmetric InfoNCE at the
learnable temperature `exp(-logit_scale)`.

Texts are tokenized by the project's tokenizer (models/tokenizer.py) with `tokenizers`' own truncation and padding,
at `max_text_length` / `max_code_length` tokens per kind.

The bundle folder holds `encoder.safetensors`, `config.json` (`kind: dual_encoder`, the config, extras such as the
training config), `tokenizer.json`, whatever the caller put there first (the stage's `train.json`) and
`manifest.json` (size and sha256 of every file, checked on load). Nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_model

from models.checkpoint import CONFIG, MANIFEST, load_json, load_tensors, verify_manifest, write_manifest
from models.errors import ArtifactError
from models.files import file_sha256
from models.quantize import linear_weight_bytes, quantize_linears
from models.tokenizer import PAD, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, GPTConfig

KIND = "dual_encoder"
"""`kind` in config.json."""
KINDS = ("text", "code")
"""What a tower reads: natural language or code."""
POOLINGS = ("mean", "last", "mean_lexical")
"""`mean_lexical` = `mean` concatenated with the mean of the input token embeddings (a lexical path)."""
WEIGHTS = "encoder.safetensors"
INIT_TEMPERATURE = 0.07
"""CLIP's initial softmax temperature: logit_scale starts at log(1 / 0.07)."""
MAX_LOGIT_SCALE = math.log(100.0)
"""CLIP's clamp of logit_scale: logits are at most 100 x cosine."""


@dataclass(frozen=True)
class DualEncoderConfig:
    """Trunk shape, tower layout, pooling and sequence lengths of a dual encoder."""

    gpt: GPTConfig
    """Shape of the pretrained trunk (a dict is converted)."""
    shared_trunk: bool = True
    """One trunk for both kinds (each kind keeps its own projection) or one copy of the trunk per kind."""
    pooling: str = "mean"
    """`mean` over the real tokens or the `last` real token's state."""
    dim: int = 128
    """Width of the embeddings."""
    max_text_length: int = 64
    """Tokens read of a text (the rest is cut off)."""
    max_code_length: int = 128
    """Tokens read of a piece of code."""

    def __post_init__(self) -> None:
        if isinstance(self.gpt, dict):
            object.__setattr__(self, "gpt", GPTConfig.from_dict(self.gpt))
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dim < 1:
            raise ValueError("dim must be >= 1")
        for name in ("max_text_length", "max_code_length"):
            if not 1 <= getattr(self, name) <= self.gpt.block_size:
                raise ValueError(f"{name} must be in [1, block_size {self.gpt.block_size}], got {getattr(self, name)}")

    def max_length(self, kind: str) -> int:
        """Tokens read of one text of `kind`."""
        return self.max_text_length if check_kind(kind) == "text" else self.max_code_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DualEncoderConfig":
        return cls(**d)


def check_kind(kind: str) -> str:
    """`kind`, or a ValueError naming KINDS."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


class DualEncoderNet(nn.Module):
    """Text and code towers (trunk + pooling + projection) and CLIP's learnable logit scale."""

    def __init__(self, cfg: DualEncoderConfig, temperature: float = INIT_TEMPERATURE) -> None:
        super().__init__()
        self.config = cfg
        names = ("shared",) if cfg.shared_trunk else KINDS
        self.trunks = nn.ModuleDict({name: GPT(cfg.gpt) for name in names})
        for trunk in self.trunks.values():
            trunk.lm_head = nn.Identity()  # an encoder predicts no tokens (the LM head was tied to the embeddings)
        width = cfg.gpt.n_embd * (2 if cfg.pooling == "mean_lexical" else 1)
        self.heads = nn.ModuleDict({kind: nn.Linear(width, cfg.dim) for kind in KINDS})
        first = torch.randn(cfg.dim, width) * width**-0.5
        for head in self.heads.values():  # both start as one projection: text and code begin in one space
            head.weight.data.copy_(first)
            nn.init.zeros_(head.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def trunk(self, kind: str) -> GPT:
        """The trunk that reads `kind`."""
        return self.trunks["shared" if self.config.shared_trunk else check_kind(kind)]

    def load_trunks(self, lm: GPT) -> None:
        """Initialise every trunk from the pretrained language model `lm` (same shape)."""
        state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
        for trunk in self.trunks.values():
            trunk.load_state_dict(state)

    def scale(self) -> torch.Tensor:
        """The logits' multiplier exp(logit_scale), clamped at 100 (CLIP)."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
        """L2-normalised embeddings (B, dim) of right-padded ids (B, T) whose real tokens `mask` (B, T) marks."""
        lengths = mask.sum(1).clamp(min=1)  # (B,)
        h = self.trunk(kind).hidden(ids, lengths)  # (B, T, C)
        if self.config.pooling == "last":
            pooled = h[torch.arange(h.size(0), device=h.device), lengths - 1]  # (B, C)
        else:
            m = mask.to(h.dtype)[..., None]  # (B, T, 1)
            pooled = (h * m).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        if self.config.pooling == "mean_lexical":  # the words themselves: a docstring's words recur in identifiers
            e = self.trunk(kind).wte(ids).to(h.dtype)  # (B, T, C)
            pooled = torch.cat([pooled, (e * m).sum(1) / lengths[:, None].to(h.dtype)], -1)  # (B, 2C)
        return F.normalize(self.heads[check_kind(kind)](pooled).float(), dim=-1)  # (B, dim)


def kind_tokenizer(file: Path | str, max_length: int):
    """The project's tokenizer from `file` (tokenizer.json or its folder), truncating at `max_length` tokens and
    padding each batch to its longest text with PAD."""
    tok = load_tokenizer(file)
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id(PAD), pad_token=PAD)
    return tok


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (N, T) and the mask of real tokens (N, T) of `texts` (a `kind_tokenizer`); an empty text
    reads as one pad token, so every row has a state to pool."""
    encs = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long).reshape(len(encs), -1)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.bool).reshape(len(encs), -1)
    if ids.size(1) == 0:
        ids = torch.full((len(encs), 1), tokenizer.token_to_id(PAD), dtype=torch.long)
        mask = torch.zeros(len(encs), 1, dtype=torch.bool)
    mask[:, 0] = True
    return ids, mask


class Encoder:
    """A dual encoder ready for inference: eval mode, no gradients; concurrent `embed` calls are safe (nothing is
    mutated after construction).

    `version` is the sha256 of the weights file it was loaded from (an int8 copy keeps it and says `variant`
    int8: it is the same model, quantized).
    """

    def __init__(self, net: DualEncoderNet, tokenizer_file: Path | str, version: str, variant: str = "fp32") -> None:
        self.net = net.eval()
        self.config: DualEncoderConfig = net.config
        self.dim = self.config.dim
        self.version = version
        self.variant = variant
        self.tokenizer_file = Path(tokenizer_file)
        self.tokenizers = {kind: kind_tokenizer(tokenizer_file, self.config.max_length(kind)) for kind in KINDS}
        self.device = next((p.device for p in net.parameters()), torch.device("cpu"))

    def embed(self, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
        """Unit-norm float32 embeddings (n, dim) of `texts` by the `kind` tower, in the given order (texts are run
        in batches of similar lengths, so little is padded)."""
        tokenizer = self.tokenizers[check_kind(kind)]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                rows = order[i : i + batch_size]
                ids, mask = encode(tokenizer, [texts[r] for r in rows])
                out[rows] = self.net(ids.to(self.device), mask.to(self.device), kind).float().cpu().numpy()
        return out

    def quantized(self, backend: str = "torch.ao") -> "Encoder":
        """An int8 copy (every Linear of both towers, through models/quantize.py's `quantize_linears`); this
        encoder is left as it is."""
        net = quantize_linears(copy.deepcopy(self.net).eval(), backend, per_channel=True)
        return Encoder(net, self.tokenizer_file, self.version, "int8")

    def size_mb(self) -> float:
        """MiB of the weights in memory (int8 Linears at one byte per weight plus their scales)."""
        linear = {id(m.weight) for m in self.net.modules() if isinstance(m, nn.Linear)}
        rest = sum(p.numel() * p.element_size() for p in self.net.parameters() if id(p) not in linear)
        return (rest + linear_weight_bytes(self.net)) / 2**20


def write_encoder(folder: Path, net: DualEncoderNet, tokenizer_file: Path, extra: dict | None = None) -> None:
    """Write the bundle into existing folder `folder` (stages pass an atomic one): weights, config.json with
    `extra` entries, tokenizer.json, then the manifest of every file in the folder (a file the caller wrote
    there first, like train.json, included)."""
    folder, tokenizer_file = Path(folder), Path(tokenizer_file)
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / TOKENIZER_FILE
    save_model(net, str(folder / WEIGHTS))
    meta = {"kind": KIND, "config": net.config.to_dict(), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))
    shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
    write_manifest(folder)


def _net(folder: Path) -> DualEncoderNet:
    meta = load_json(folder / CONFIG, ("kind", "config"))
    if meta["kind"] != KIND:
        raise ArtifactError(folder / CONFIG, f"not a dual encoder (kind {meta['kind']!r})")
    try:
        net = DualEncoderNet(DualEncoderConfig.from_dict(meta["config"]))
    except (TypeError, ValueError) as e:
        raise ArtifactError(folder / CONFIG, f"config does not fit kind {KIND!r}: {e}") from None
    try:
        net.load_state_dict(load_tensors(folder / WEIGHTS), strict=True)
    except RuntimeError as e:
        problem = f"weights do not match {CONFIG} ({' '.join(str(e).split())[:300]})"
        raise ArtifactError(folder / WEIGHTS, problem) from None
    return net


def load_encoder(folder: Path | str) -> Encoder:
    """Load a bundle folder after checking it against its manifest.

    Raises:
        ArtifactError: the folder, its manifest or a file of it is missing, truncated, corrupt or does not fit.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(folder, "no such encoder folder")
    if not verify_manifest(folder):
        raise ArtifactError(folder / MANIFEST, "missing")
    net = _net(folder)
    try:
        load_tokenizer(folder / TOKENIZER_FILE)
    except Exception as e:  # the tokenizers library raises a bare Exception on a broken file
        problem = f"not a readable tokenizer ({' '.join(str(e).split())[:200]})"
        raise ArtifactError(folder / TOKENIZER_FILE, problem) from None
    return Encoder(net, folder / TOKENIZER_FILE, file_sha256(folder / WEIGHTS))


def clip_loss(text: torch.Tensor, code: torch.Tensor, scale: torch.Tensor, negatives: torch.Tensor | None = None):
    """CLIP's symmetric InfoNCE of matching rows of unit embeddings `text` and `code` (B, dim) at logit multiplier
    `scale`: the mean of text -> code cross-entropy (over the batch's code plus optional extra `negatives` (N, dim),
    e.g. hard negatives) and code -> text cross-entropy (over the batch's texts)."""
    targets = torch.arange(text.size(0), device=text.device)
    pool = code if negatives is None else torch.cat([code, negatives])  # (B + N, dim)
    text_to_code = scale * text @ pool.T  # (B, B + N)
    code_to_text = scale * code @ text.T  # (B, B)
    return (F.cross_entropy(text_to_code.float(), targets) + F.cross_entropy(code_to_text.float(), targets)) / 2
