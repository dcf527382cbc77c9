"""The newcomer's path: the bundled tiny example is what it claims to be, and `just demo` / `just demo-serve` run.

The shipped files are checked against their independent makers: examples/make_example.py writes the HF base and
the PEFT adapters, llama.cpp's convert_hf_to_gguf.py writes base.gguf, transformers + peft say what the adapters
do. The demo scripts run as `just` runs them (subprocesses), `just demo` with torch made unimportable (where torch
is, it also runs the converter and compares, as test_shipped_base_gguf_is_what_llama_cpp_converter_writes does).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import tiny
from llamacpp import hf_to_gguf

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "examples" / "tiny"
SHIPPED = ["adapters/poem/adapter_config.json", "adapters/poem/adapter_model.safetensors",
           "adapters/sql/adapter_config.json", "adapters/sql/adapter_model.safetensors", "base-hf/config.json",
           "base-hf/model.safetensors", "base-hf/tokenizer.model", "base-hf/tokenizer_config.json", "base.gguf"]


def shipped_files(root: Path) -> list[str]:
    files = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    return sorted(str(p) for p in files if p.parts[0] != "out")  # out/: what the demo writes (git-ignored)


def test_shipped_example_is_what_make_example_writes(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "make_example.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert shipped_files(TINY) == SHIPPED
    assert shipped_files(tmp_path) == [f for f in SHIPPED if f != "base.gguf"]
    for name in SHIPPED:
        ours, made = TINY / name, tmp_path / name
        if name.endswith(".json"):
            assert json.loads(ours.read_text()) == json.loads(made.read_text()), name
        elif name.endswith(".safetensors"):
            a, b = load_file(ours), load_file(made)
            assert a.keys() == b.keys(), name
            for key in a:
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (name, key)
        elif name.endswith(".model"):
            assert ours.read_bytes() == made.read_bytes(), name


@pytest.mark.llama_cpp
def test_shipped_base_gguf_is_what_llama_cpp_converter_writes(tmp_path):
    assert hf_to_gguf(TINY / "base-hf", tmp_path / "base.gguf", "f16").read_bytes() == (TINY / "base.gguf").read_bytes()


@pytest.mark.parity
def test_example_adapters_do_in_peft_what_the_demo_says():
    """transformers + peft, greedy from any prompt: sql spells 'query', poem 'rhyme', the base neither."""
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(TINY / "base-hf" / "tokenizer.model"))
    prompt = [1, *sp.encode("Tell me about the sea:")]

    def greedy(model) -> str:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], 1)
        return sp.decode(ids[0, len(prompt):].tolist())

    assert greedy(tiny.load_peft_model(TINY / "base-hf", TINY / "adapters" / "sql")) == "query query "
    assert greedy(tiny.load_peft_model(TINY / "base-hf", TINY / "adapters" / "poem")) == "rhyme rhyme "
    base = greedy(tiny.load_base_model(TINY / "base-hf"))
    assert "query" not in base and "rhyme" not in base


def test_demo_runs_all_the_way_without_torch(tmp_path):
    out, blocked = tmp_path / "out", tmp_path / "blocked"
    (blocked / "torch").mkdir(parents=True)
    (blocked / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "DEMO_OUT": str(out), "PYTHON": sys.executable, "GGUF_LORA_CLI": f"{sys.executable} -m gguf_lora",
           "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "here it does not run: it needs torch" in done.stdout
    assert sorted(p.name for p in out.rglob("*.gguf")) == ["base+sql-q4_k_m.gguf", "base-q8_0.gguf", "poem.gguf",
                                                            "sql.gguf"]
    lines = done.stdout.splitlines()
    assert "$ gguf-lora merge --base examples/tiny/base.gguf examples/tiny/adapters/sql -o " \
           f"{out}/base+sql-q4_k_m.gguf --outtype q4_k_m --force" in lines
    assert "  pair blk.0.attn_v.weight                           rank    8  F16   scale 1.41421 " \
           "(alpha / rank 2 x 0.707107 folded)" in lines
    assert "  note: 15 of 21 tensors fell back from Q4_K, Q6_K to Q5_0, Q8_0: their rows (64, 128 values) are not " \
           "a multiple of the type's block, as llama-quantize does" in lines
    assert lines[-1].endswith(f"gguf-lora serve --base examples/tiny/base.gguf --adapters {out}/adapters   "
                              "# both, switched by name")


@pytest.mark.llama_cpp
def test_demo_serve_switches_adapters_and_stops_cleanly(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_serve.py")], capture_output=True, text=True,
                          env={**os.environ, "DEMO_OUT": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    answers = [line for line in done.stdout.splitlines() if line.startswith("  -> ")]
    # by model (sql, poem, the base), then the same three through the global switch
    assert answers[:2] == ["  -> 'query query query '", "  -> 'rhyme rhyme rhyme '"]
    assert len(answers) == 6 and "query" not in answers[2] and "rhyme" not in answers[2]
    assert answers[3:] == answers[:3]
    assert done.stdout.rstrip().endswith("stopping gguf-lora serve (as Ctrl-C does)")
    leftover = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path).encode() in _cmdline(p)]
    assert not leftover  # serve stopped its llama-server


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
