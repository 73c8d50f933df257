"""bench/train_throughput.py --compare-nanogpt: nanoGPT's output parser, its command line, bad checkouts, and one
end-to-end run against a tiny fake nanoGPT checkout (no network, nanoGPT's real code is not needed)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
tt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tt)

# nanoGPT's bench.py (commit 3adf61e) with --preset nanogpt-cpu's shape on a 2-core VM, step lines cut to a few.
CAPTURED = (
    """Overriding: batch_size = 12
Overriding: block_size = 64
Overriding: bias = False
Overriding: real_data = False
Overriding: device = cpu
Overriding: dtype = float32
Overriding: compile = False
Overriding: profile = False
"""
    'lmforge-shim: GPTConfig {"block_size": 64, "vocab_size": 50304, "n_layer": 4, "n_head": 4, "n_embd": 128, '
    '"dropout": 0, "bias": false}\n'
    """number of parameters: 7.23M
num decayed parameter tensors: 18, with 7,233,536 parameters
num non-decayed parameter tensors: 9, with 1,152 parameters
using fused AdamW: False
0/10 loss: 10.8489
1/10 loss: 10.7568
9/10 loss: 10.2001
0/20 loss: 10.1482
1/20 loss: 10.0988
18/20 loss: 9.4512
19/20 loss: 9.4186
time per iteration: 2155.1944ms, MFU: 0.00%
"""
)

# A stand-in for a nanoGPT checkout: the same module layout, `--key=value` overrides and output line as the real one,
# GPT-2 small's shape hard-coded as in bench.py, and asserts on what the shim must have set up.
FAKE_CONFIGURATOR = """
import sys
from ast import literal_eval
for arg in sys.argv[1:]:
    key, val = arg[2:].split("=")
    assert key in globals(), f"Unknown config key: {key}"
    try:
        val = literal_eval(val)
    except (SyntaxError, ValueError):
        pass
    assert type(val) == type(globals()[key])
    globals()[key] = val
"""

FAKE_MODEL = """
from dataclasses import dataclass
import torch
import torch.nn as nn

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)

    def forward(self, idx, targets):
        logits = self.head(self.wte(idx))
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
"""

FAKE_BENCH = """
import os
import time
import torch
from model import GPTConfig, GPT
batch_size = 12
block_size = 1024
bias = False
real_data = True
seed = 1337
device = 'cuda'
dtype = 'bfloat16'
compile = True
profile = False
exec(open('configurator.py').read())
assert (real_data, device, dtype, compile, profile) == (False, 'cpu', 'float32', False, False)
assert "LMFORGE_NANOGPT_MODEL" not in os.environ  # the shim cleans up after itself
assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"]) == 1
x = torch.randint(50304, (batch_size, block_size), device=device)
y = torch.randint(50304, (batch_size, block_size), device=device)
model = GPT(GPTConfig(block_size=block_size, n_layer=12, n_head=12, n_embd=768, dropout=0, bias=bias))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
torch.cuda.synchronize()  # fails on a CPU-only torch without the shim
for stage, num_steps in enumerate([2, 3]):
    t0 = time.time()
    for k in range(num_steps):
        logits, loss = model(x, y)  # indexes out of range unless the tokens were drawn below the preset's vocab
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"{k}/{num_steps} loss: {loss.item():.4f}")
    torch.cuda.synchronize()
    dt = time.time() - t0
    if stage == 1:
        print(f"time per iteration: {dt/num_steps*1000:.4f}ms, MFU: {0.0:.2f}%")
"""

TINY = dict(
    model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=128), batch=2, device="cpu", precision="fp32"
)


def fake_checkout(folder: Path, bench: str = FAKE_BENCH) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.py", bench), ("model.py", FAKE_MODEL), ("configurator.py", FAKE_CONFIGURATOR)):
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_parser_reads_captured_nanogpt_output():
    out = tt.parse_nanogpt_output(CAPTURED)
    assert out["ms_per_iter"] == 2155.1944
    assert out["mfu_a100"] == 0.0
    assert out["config"] == {
        "block_size": 64,
        "vocab_size": 50304,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "dropout": 0,
        "bias": False,
    }
    assert tt.parse_nanogpt_output("time per iteration: 12.5000ms, MFU: 38.61%\n") == {
        "ms_per_iter": 12.5,
        "mfu_a100": 0.3861,
        "config": None,
    }


def test_parser_rejects_output_without_the_timing_line():
    with pytest.raises(tt.NanoGPTError, match=r"could not find 'time per iteration.*last line: '19/20 loss: 9.4186'"):
        tt.parse_nanogpt_output(CAPTURED.rsplit("time per", 1)[0])


def test_bad_checkout_paths_give_one_line_errors(tmp_path):
    with pytest.raises(tt.NanoGPTError, match="no such folder") as e:
        tt.nanogpt_checkout(tmp_path / "nope")
    assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(tt.NanoGPTError, match="not a folder"):
        tt.nanogpt_checkout(tmp_path / "file")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.py").write_text("")
    with pytest.raises(tt.NanoGPTError, match="not a nanoGPT checkout, missing bench.py, configurator.py"):
        tt.nanogpt_checkout(tmp_path / "half")


def test_main_exits_with_the_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tt.main(["--preset", "nanogpt-cpu", "--compare-nanogpt", str(tmp_path / "nope")])
    assert str(e.value).startswith("train_throughput: --compare-nanogpt ") and "no such folder" in str(e.value)


def test_cpu_command_line_and_shim_environment():
    argv, env = tt.nanogpt_command(Path("/src/nanoGPT"), "cpu-default", False, 2, python="py")
    assert argv == [
        "py",
        "bench.py",
        "--batch_size=16",
        "--block_size=128",
        "--bias=False",
        "--real_data=False",
        "--device=cpu",
        "--dtype=float32",
        "--compile=False",
        "--profile=False",
    ]
    assert json.loads(env["LMFORGE_NANOGPT_SHAPE"]) == {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 4096}
    assert (env["LMFORGE_NANOGPT_MODEL"], env["LMFORGE_NANOGPT_CUDA_SYNC"]) == (str(Path("/src/nanoGPT/model.py")), "0")
    assert env["LMFORGE_NANOGPT_THREADS"] == env["OMP_NUM_THREADS"] == "2"


def test_gpt2_command_line_is_cuda_bf16_compiled():
    argv, env = tt.nanogpt_command(Path("/src/nanoGPT"), "gpt2-124m", True, None, python="py")
    assert argv == [
        "py",
        "bench.py",
        "--batch_size=16",
        "--block_size=1024",
        "--bias=False",
        "--real_data=False",
        "--device=cuda",
        "--dtype=bfloat16",
        "--compile=True",
        "--profile=False",
    ]
    assert json.loads(env["LMFORGE_NANOGPT_SHAPE"]) == {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304}
    assert env["LMFORGE_NANOGPT_CUDA_SYNC"] == "1" and "OMP_NUM_THREADS" not in env  # no thread override unless asked
    assert "--compile=False" in tt.nanogpt_command(Path("/src/nanoGPT"), "gpt2-124m", False, None)[0]


def test_tokens_per_s_from_ms_per_iter_and_the_shape_check(tmp_path, monkeypatch):
    def fake_run(stdout):
        monkeypatch.setattr(
            tt.subprocess, "run", lambda argv, **kw: tt.subprocess.CompletedProcess(argv, 0, stdout, "")
        )

    fake_run(CAPTURED.replace("2155.1944ms", "250.0000ms"))
    assert tt.run_nanogpt(tmp_path, "nanogpt-cpu", False, 2) == {
        "ms_per_iter": 250.0,
        "tokens_per_s": 12 * 64 / 0.25,
        "mfu_a100": 0.0,
    }
    with pytest.raises(
        tt.NanoGPTError, match="not the preset's"
    ):  # the captured run had nanogpt-cpu's shape, not cpu-default's
        tt.run_nanogpt(tmp_path, "cpu-default", False, 2)
    fake_run("\n".join(line for line in CAPTURED.splitlines() if not line.startswith("lmforge-shim")))
    with pytest.raises(
        tt.NanoGPTError, match=r"did the shim load\?"
    ):  # bench.py's own GPT-2 small shape would be timed
        tt.run_nanogpt(tmp_path, "nanogpt-cpu", False, 2)


def test_failing_bench_reports_its_last_stderr_line(tmp_path, monkeypatch):
    monkeypatch.setitem(tt.PRESETS, "tiny-cpu", TINY)
    folder = fake_checkout(tmp_path / "nanoGPT", bench="import sys\nprint('some output')\nsys.exit('boom: no data')\n")
    with pytest.raises(tt.NanoGPTError, match=r"failed \(exit 1\): boom: no data$"):
        tt.run_nanogpt(folder, "tiny-cpu", False, 1)
    (folder / "bench.py").write_text("print('nothing to see')\n")
    with pytest.raises(tt.NanoGPTError, match="could not find 'time per iteration"):
        tt.run_nanogpt(folder, "tiny-cpu", False, 1)


def test_end_to_end_against_a_fake_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(tt.PRESETS, "tiny-cpu", TINY)
    folder = fake_checkout(tmp_path / "nanoGPT")
    tt.main(
        [
            "--preset",
            "tiny-cpu",
            "--compare-nanogpt",
            str(folder),
            "--repeat",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    r = json.loads(out.strip().splitlines()[-1])
    table = {line.split()[0] for line in out.splitlines()[2:-1]}
    assert {
        "tokens_per_s",
        "nanogpt_tokens_per_s",
        "ratio_vs_nanogpt",
        "nanogpt_ms_per_iter",
    } <= table  # both figures and the ratio
    assert r["runs"] == 2 and len(r["tokens_per_s_runs"]) == len(r["nanogpt_tokens_per_s_runs"]) == 2
    assert r["nanogpt_ms_per_iter"] > 0 and r["nanogpt_tokens_per_s"] == pytest.approx(
        statistics.median(r["nanogpt_tokens_per_s_runs"]), rel=1e-3
    )
    assert r["ratio_vs_nanogpt"] == pytest.approx(r["tokens_per_s"] / r["nanogpt_tokens_per_s"], rel=1e-2)
    assert (r["steps"], r["warmup"], r["threads"], r["nanogpt_steps"], r["nanogpt_warmup"]) == (2, 1, 1, 20, 10)
    assert r["nanogpt_commit"] is None  # not a git checkout
    assert err.count("run ") == 2 and "nanoGPT" in err
