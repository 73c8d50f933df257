"""Hugging Face GPT-2 checkpoints in and out: `read_hf_gpt2` imports one, `export_hf` writes lmforge models as one.

A Hugging Face folder is `config.json` + `model.safetensors` + `tokenizer.json`, read and written here with json and
safetensors only: the library never needs `transformers` (the tests use it to check the logits).

Import (`read_hf_gpt2`): GPT-2 family only (`model_type: gpt2`: GPT-2, DistilGPT2, any `GPT2LMHeadModel` or
`GPT2Model`), weights in `model.safetensors` or the shards `model.safetensors.index.json` lists (a pickle-only
`pytorch_model.bin` is refused: lmforge never unpickles; config.json and tokenizer.json: models/hf_files.py). Conv1D
weights are stored (in, out) and are transposed; GPT-2 has biases everywhere (`bias: true`), learned positions
(`n_positions` becomes block_size), LayerNorm eps 1e-5 and tied embeddings. `activation_function` `gelu_new` or
`gelu_pytorch_tanh` becomes `activation: gelu_tanh`, `gelu` stays exact. The tokenizer gains lmforge's `<pad>` and
`<mask>` when it lacks them: they take the ids after the tokenizer's last (GPT-2: 50257 and 50258), inside the padded
vocabulary (embedding rows past the checkpoint's vocabulary start at zero).

Export (`export_hf`): an LM becomes `GPT2LMHeadModel`; a classifier becomes `GPT2ForSequenceClassification` when
transformers computes exactly what lmforge does (`pooling: last` and dense attention over its whole length; GPT-2's
`score` has no bias, so the head's bias is folded into the final LayerNorm's bias), else the trunk as `GPT2Model`
plus `classifier_head.safetensors` (`weight`, `bias`) and `lmforge.json` (pooling, window, what to do). lmforge
models without biases get zero biases. Rotary positions, pruned heads or MLPs, bidirectional (masked-LM) trunks and
an LM with a window shorter than its context have no GPT-2 form: export refuses them (`--format onnx` exports them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.checkpoint import CONFIG, WEIGHTS, load_classifier, load_json, load_lm, load_tensors, read_config
from models.classifier import TransformerClassifier
from models.errors import ArtifactError
from models.hf_files import EPS, HF_ACTIVATIONS, read_gpt2_config, read_gpt2_tokenizer
from models.tokenizer import EOT, MASK, PAD, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, GPTConfig, padded_vocab

EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
"""lmforge `activation` -> GPT-2 `activation_function`."""
SHARD_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
HEAD_FILE = "classifier_head.safetensors"
NOTE_FILE = "lmforge.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


# --------------------------------------------------------------------------------------------- import
def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (one file or the shards an index lists) keyed as GPT2Model names (the `transformer.`
    prefix of *LMHeadModel dropped)."""
    index = folder / SHARD_INDEX
    if not (folder / WEIGHTS).exists() and index.exists():
        shards = sorted(set(load_json(index, ("weight_map",))["weight_map"].values()))
        tensors = {k: v for shard in shards for k, v in load_tensors(folder / shard).items()}
    elif not (folder / WEIGHTS).exists() and (folder / PICKLE_WEIGHTS).exists():
        raise ArtifactError(
            folder / WEIGHTS,
            f"missing; {PICKLE_WEIGHTS} is a pickle, which lmforge never loads (save the model with safetensors)",
        )
    else:
        tensors = load_tensors(folder / WEIGHTS)
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def _take(tensors: dict, file: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Tensor `name` of the checkpoint, which must have `shape`."""
    if name not in tensors:
        raise ArtifactError(file, f"tensor {name} missing")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise ArtifactError(file, f"tensor {name} has shape {tuple(t.shape)}, config.json needs {shape}")
    return t.float()


def _gpt_state(tensors: dict, cfg: GPTConfig, file: Path, n_vocab: int) -> dict[str, torch.Tensor]:
    """lmforge GPT state_dict from GPT-2 tensors (Conv1D weights are (in, out): transposed)."""
    C, V = cfg.n_embd, padded_vocab(cfg.vocab_size)
    wte = torch.zeros(V, C)
    wte[:n_vocab] = _take(tensors, file, "wte.weight", (n_vocab, C))
    state = {"wte.weight": wte, "wpe.weight": _take(tensors, file, "wpe.weight", (cfg.block_size, C))}
    for i in range(cfg.n_layer):
        hidden = cfg.ffn(i)
        for ours, theirs, n_in, n_out in (
            ("attn.qkv", "attn.c_attn", C, 3 * C),
            ("attn.proj", "attn.c_proj", C, C),
            ("mlp.fc", "mlp.c_fc", C, hidden),
            ("mlp.proj", "mlp.c_proj", hidden, C),
        ):
            state[f"blocks.{i}.{ours}.weight"] = _take(tensors, file, f"h.{i}.{theirs}.weight", (n_in, n_out)).T
            state[f"blocks.{i}.{ours}.bias"] = _take(tensors, file, f"h.{i}.{theirs}.bias", (n_out,))
        for ln in ("ln_1", "ln_2"):
            for part in ("weight", "bias"):
                state[f"blocks.{i}.{ln}.{part}"] = _take(tensors, file, f"h.{i}.{ln}.{part}", (C,))
    for part in ("weight", "bias"):
        state[f"ln_f.{part}"] = _take(tensors, file, f"ln_f.{part}", (C,))
    state["lm_head.weight"] = wte
    return state


def read_hf_gpt2(folder: Path | str) -> tuple[GPT, object]:
    """A local Hugging Face GPT-2 family checkpoint as an lmforge GPT (eval mode) and its tokenizer.

    The tokenizer gains `<pad>` and `<mask>` when it lacks them; the model's vocab_size is the tokenizer's size then
    (at least the checkpoint's). See the module docstring for what is mapped and what is refused.

    Raises:
        ArtifactError: one line naming the file and field that is missing, not GPT-2 or does not match.
    """
    folder = Path(folder)
    hf = read_gpt2_config(folder)
    n_vocab = int(hf["vocab_size"])
    tok = read_gpt2_tokenizer(folder)
    n_inner = hf.get("n_inner") or 4 * int(hf["n_embd"])
    try:
        cfg = GPTConfig(
            vocab_size=max(n_vocab, tok.get_vocab_size()),
            block_size=int(hf["n_positions"]),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            bias=True,
            activation=HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
            layer_ffn=[] if n_inner == 4 * int(hf["n_embd"]) else [int(n_inner)] * int(hf["n_layer"]),
        )
    except ValueError as e:
        raise ArtifactError(folder / CONFIG, str(e)) from None
    state = _gpt_state(_weights(folder), cfg, folder / WEIGHTS, n_vocab)
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval(), tok


# --------------------------------------------------------------------------------------------- export
def _refuse_non_gpt2(cfg: GPTConfig, where: Path, whole_context: bool) -> None:
    """Raise when `cfg` has no GPT-2 form (`whole_context`: a window must cover the whole block too)."""
    why = None
    if cfg.pos_encoding != "learned":
        why = "rotary positions have no GPT-2 form; export --format onnx"
    elif cfg.layer_heads or cfg.layer_ffn:
        why = "pruned attention heads or MLP widths have no GPT-2 form; export --format onnx"
    elif not cfg.causal:
        why = "a bidirectional (masked-LM) trunk has no GPT-2 form; export --format onnx"
    elif whole_context and cfg.attn_window and cfg.attn_window < cfg.block_size:
        why = f"attn_window {cfg.attn_window} < block_size {cfg.block_size} has no GPT-2 form; export --format onnx"
    if why:
        raise ArtifactError(where / CONFIG, why)


def _gpt2_config(cfg: GPTConfig, tok, architecture: str) -> dict:
    """config.json of the GPT-2 form of `cfg`."""
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": EXPORT_ACTIVATIONS[cfg.activation],
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": pad,
        "tie_word_embeddings": True,
        "dtype": "float32",
    }


def _gpt2_tensors(gpt: GPT, prefix: str) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (Conv1D (in, out) layout, zero biases where lmforge has none) of an lmforge GPT."""
    sd = {k: v.detach().float() for k, v in gpt.state_dict().items()}
    C = gpt.config.n_embd

    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n))

    out = {"wte.weight": sd["wte.weight"][: gpt.config.vocab_size], "wpe.weight": sd["wpe.weight"]}
    for i in range(gpt.config.n_layer):
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc")):
            w = sd[f"blocks.{i}.{ours}.weight"]
            out[f"h.{i}.{theirs}.weight"] = w.T
            out[f"h.{i}.{theirs}.bias"] = bias(f"blocks.{i}.{ours}.bias", w.shape[0])
        out[f"h.{i}.mlp.c_proj.weight"] = sd[f"blocks.{i}.mlp.proj.weight"].T
        out[f"h.{i}.mlp.c_proj.bias"] = bias(f"blocks.{i}.mlp.proj.bias", C)
        for ln in ("ln_1", "ln_2"):
            out[f"h.{i}.{ln}.weight"] = sd[f"blocks.{i}.{ln}.weight"]
            out[f"h.{i}.{ln}.bias"] = bias(f"blocks.{i}.{ln}.bias", C)
    out["ln_f.weight"], out["ln_f.bias"] = sd["ln_f.weight"], bias("ln_f.bias", C)
    return {prefix + k: v.contiguous().clone() for k, v in out.items()}


def _write_tokenizer(tok, d: Path, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json, so that `AutoTokenizer.from_pretrained(d)` works."""
    tok.save(str(d / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": PAD,
        "mask_token": MASK,
        "model_max_length": max_length,
        "padding_side": "right",
    }
    (d / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2))


def _write_hf(d: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def export_lm_hf(lm: GPT, tok, out: Path, where: Path) -> None:
    """An lmforge LM as a `GPT2LMHeadModel` folder `out` (with the tokenizer)."""
    _refuse_non_gpt2(lm.config, where, whole_context=True)
    _write_hf(out, _gpt2_config(lm.config, tok, "GPT2LMHeadModel"), _gpt2_tensors(lm, "transformer."))
    _write_tokenizer(tok, out, lm.config.block_size)


def _dense(cfg: GPTConfig, max_length: int) -> bool:
    """Attention over `max_length` tokens is plain causal attention (no window, or one that covers them all)."""
    return not cfg.attn_window or cfg.attn_window >= max_length


def _fold_head_bias(tensors: dict, head: torch.nn.Linear) -> bool:
    """Fold the head's bias into ln_f's bias (score(ln_f(h)) then equals head(ln_f(h))); False if it does not fit."""
    w, b = head.weight.detach().double(), head.bias.detach().double()
    shift = torch.linalg.pinv(w) @ b  # (C,): the smallest shift with w @ shift = b
    if not torch.allclose(w @ shift, b, atol=1e-6):
        return False
    tensors["transformer.ln_f.bias"] = (tensors["transformer.ln_f.bias"].double() + shift).float()
    return True


def export_classifier_hf(model: TransformerClassifier, tok, max_length: int, out: Path, where: Path) -> str:
    """An lmforge classifier as an HF folder `out`; returns the architecture written (see the module docstring)."""
    cfg = model.config
    _refuse_non_gpt2(cfg.trunk, where, whole_context=False)
    labels = {"id2label": dict(enumerate(cfg.labels)), "label2id": {lab: i for i, lab in enumerate(cfg.labels)}}
    if cfg.pooling == "last" and _dense(cfg.trunk, max_length):
        tensors = _gpt2_tensors(model.trunk, "transformer.")
        if _fold_head_bias(tensors, model.head):
            tensors["score.weight"] = model.head.weight.detach().float().contiguous().clone()
            config = {**_gpt2_config(cfg.trunk, tok, "GPT2ForSequenceClassification"), **labels}
            _write_hf(out, config, tensors)
            _write_tokenizer(tok, out, max_length)
            return "GPT2ForSequenceClassification"
    _write_hf(out, {**_gpt2_config(cfg.trunk, tok, "GPT2Model"), **labels}, _gpt2_tensors(model.trunk, ""))
    head = {"weight": model.head.weight.detach().float().contiguous(), "bias": model.head.bias.detach().float()}
    save_file({k: v.clone() for k, v in head.items()}, str(out / HEAD_FILE))
    note = {
        "pooling": cfg.pooling,
        "attn_window": cfg.trunk.attn_window,
        "attn_global": cfg.trunk.attn_global,
        "attn_chunked": cfg.trunk.attn_chunked,
        "max_length": max_length,
        "labels": list(cfg.labels),
        "head": f"{HEAD_FILE}: logits = hidden @ weight.T + bias, hidden = the {cfg.pooling} pooling of "
        "last_hidden_state over the real tokens",
        "exact_up_to_tokens": cfg.trunk.attn_window if not _dense(cfg.trunk, max_length) else max_length,
        "note": "GPT2Model attends densely: it reproduces lmforge exactly for texts of at most "
        "exact_up_to_tokens tokens; longer texts read differently (lmforge's windowed attention)",
    }
    (out / NOTE_FILE).write_text(json.dumps(note, indent=2))
    _write_tokenizer(tok, out, max_length)
    return "GPT2Model"


def export_hf(source: Path | str, out: Path | str) -> dict[str, str]:
    """Write a bundle folder (tokenizer.json, classifier/, lm/) as Hugging Face folders `out/classifier` and
    `out/lm`; returns {part: architecture}. `out` must be new or empty (callers write into a temp folder).

    Raises:
        ArtifactError: a part that is not a float Transformer or has no GPT-2 form (one line naming it and why).
    """
    source, out = Path(source), Path(out)
    if not (source / TOKENIZER_FILE).is_file() or not (source / "classifier").is_dir():
        raise ArtifactError(source, f"not a bundle folder (needs {TOKENIZER_FILE} and classifier/)")
    meta = read_config(source / "classifier")
    if meta["kind"] != "classifier":
        raise ArtifactError(
            source / "classifier" / CONFIG,
            f"kind {meta['kind']!r} has no Hugging Face form (only float Transformer ones)",
        )
    classifier, tok = load_classifier(source / "classifier"), load_tokenizer(source / TOKENIZER_FILE)
    max_length = int(meta.get("max_length") or classifier.config.trunk.block_size)
    written = {
        "classifier": export_classifier_hf(classifier, tok, max_length, out / "classifier", source / "classifier")
    }
    if (source / "lm").is_dir():
        export_lm_hf(load_lm(source / "lm"), tok, out / "lm", source / "lm")
        written["lm"] = "GPT2LMHeadModel"
    shutil.copy2(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    return written
