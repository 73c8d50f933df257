"""The torch-free half of a Hugging Face GPT-2 folder: its config.json checked for what lmforge's GPT can represent,
and its tokenizer.json with lmforge's special tokens added (the tokenize stage reads it without torch;
models/hf.py maps the weights)."""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import ArtifactError
from models.tokenizer import EOT, MASK, PAD, TOKENIZER_FILE, text_only

HF_CONFIG = "config.json"
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
"""GPT-2 `activation_function` -> lmforge `activation`."""
UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False}
"""GPT-2 options lmforge's GPT does not implement, with the only value it accepts."""
EPS = 1e-5
"""lmforge's LayerNorm epsilon."""
SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def _json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(file, "missing") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(file, f"not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ArtifactError(file, "no JSON object")
    return data


def read_gpt2_config(folder: Path | str) -> dict:
    """config.json of a GPT-2 family checkpoint folder, checked for what lmforge can represent.

    Raises:
        ArtifactError: the folder or file is missing, or a field is not GPT-2 or not supported (one line naming it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(folder, "no such Hugging Face checkpoint folder")
    file = folder / HF_CONFIG
    cfg = _json(file)
    if cfg.get("model_type") != "gpt2":
        arch = ", ".join(cfg.get("architectures") or []) or "none"
        raise ArtifactError(file, f"model_type {cfg.get('model_type')!r} (architectures: {arch}) is not GPT-2 family")
    for key, ok in UNSUPPORTED.items():
        if cfg.get(key, ok) != ok:
            raise ArtifactError(file, f"{key}: {cfg[key]!r} is not supported (only {ok!r})")
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ArtifactError(file, f"activation_function {act!r} is not supported ({', '.join(HF_ACTIVATIONS)})")
    if abs(float(cfg.get("layer_norm_epsilon", EPS)) - EPS) > 1e-12:
        raise ArtifactError(file, f"layer_norm_epsilon {cfg['layer_norm_epsilon']} is not supported (only {EPS})")
    if not cfg.get("scale_attn_weights", True):
        raise ArtifactError(file, "scale_attn_weights: false is not supported")
    if missing := [k for k in SHAPE_KEYS if not isinstance(cfg.get(k), int)]:
        raise ArtifactError(file, f"no integer {', '.join(missing)} entry")
    return cfg


def read_gpt2_tokenizer(folder: Path | str):
    """The folder's tokenizer.json with `<pad>` and `<mask>` added when missing (ids after the checkpoint's),
    checked against config.json's vocab_size; special-token strings in text are encoded as text (`text_only`).

    Raises:
        ArtifactError: config.json is not GPT-2 (see `read_gpt2_config`), or the tokenizer is missing, unreadable,
            larger than the model's vocabulary or has no `<|endoftext|>`.
    """
    from tokenizers import AddedToken, Tokenizer

    folder = Path(folder)
    vocab_size = read_gpt2_config(folder)["vocab_size"]
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        raise ArtifactError(file, "missing")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception on a broken file
        raise ArtifactError(file, f"not a readable tokenizer ({' '.join(str(e).split())[:200]})") from None
    if tok.get_vocab_size() > vocab_size:
        raise ArtifactError(
            file, f"{tok.get_vocab_size()} tokens, more than config.json's vocab_size {vocab_size} (not this model's)"
        )
    if tok.token_to_id(EOT) is None:
        raise ArtifactError(file, f"no {EOT} token (lmforge separates documents with it)")
    tok.add_special_tokens([AddedToken(t, special=True) for t in (PAD, MASK) if tok.token_to_id(t) is None])
    return text_only(tok)
