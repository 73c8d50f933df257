"""Bring your own checkpoint: a tiny project whose `pretrain.init_from` is a locally created Hugging Face GPT-2
folder runs through DVC (tokenize copies its tokenizer, pretrain writes it as the LM, finetune trains on it) and its
classifier serves through the service code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: the library itself never imports it
import yaml
from conftest import TINY_PROJECT, make_tiny_project

from models.bundle import write_bundle
from models.checkpoint import load_lm
from models.tokenizer import EOT, TOKENIZER_FILE, load_tokenizer

pytestmark = pytest.mark.integration


def make_gpt2_folder(folder: Path) -> Path:
    """A random GPT-2 (2 x 16, 32 positions) and a byte-level BPE tokenizer with GPT-2's `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [Path(transformers.__file__).read_text(), Path(yaml.__file__).read_text()]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save(str(folder / TOKENIZER_FILE))
    return folder


def theirs_vocab(folder: Path) -> int:
    return transformers.GPT2Config.from_pretrained(folder).vocab_size


def test_a_project_started_from_a_gpt2_folder_trains_and_serves(tmp_path):
    from deploy.core import classify
    from deploy.resolve import open_model

    gpt2 = make_gpt2_folder(tmp_path / "gpt2")
    project, env = make_tiny_project(
        tmp_path,
        {
            "pretrain": {**TINY_PROJECT["pretrain"], "init_from": str(gpt2), "max_steps": 0},
            "finetune": {**TINY_PROJECT["finetune"], "baselines": []},
        },
    )
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "finetune"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]

    tracked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["tokenize"]["params"]["params.yaml"]
    assert set(tracked) == {"tokenize", "pretrain.init_from"} and tracked["pretrain.init_from"] == str(gpt2)
    data = project / "data"
    tok = load_tokenizer(data / "tokenizer")
    assert tok.get_vocab_size() == theirs_vocab(gpt2) + 2  # the checkpoint's, with <pad> and <mask>
    lm = load_lm(data / "models" / "lm")
    assert lm.config.bias and lm.config.activation == "gelu_tanh" and lm.config.n_embd == 16
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2).eval()
    ids = torch.randint(0, theirs.config.vocab_size, (2, 20))
    with torch.no_grad():  # max_steps 0: the LM finetune started from is the checkpoint itself
        torch.testing.assert_close(lm(ids)[0][..., : theirs.config.vocab_size], theirs(ids).logits, atol=1e-4, rtol=0)

    bundle = tmp_path / "bundle"
    write_bundle(bundle, data / "tokenizer" / TOKENIZER_FILE, data / "models" / "classifier", data / "models" / "lm")
    served = open_model(str(bundle), to_store=False)
    out = classify(served, ["import asyncio\nasync def main(): await asyncio.sleep(1)", "from email import policy"])
    assert served.bundle.classifier.config.trunk.activation == "gelu_tanh"  # GPT-2's MLP, carried into finetune
    labels = set(served.bundle.labels)
    assert len(out) == 2 and all(o["label"] in labels for o in out)
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in out)
