"""Test-side helpers around the pinned llama.cpp: its HF->GGUF converter and a llama-server process.

These are the independent references: llama.cpp's own converter writes every base GGUF the tests use.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from gguf_lora.llama_cpp import find_source_file, find_tool
from gguf_lora.runtime.llama_server import free_port


# convert_hf_to_gguf.py with one change: the tokenizer is read from tokenizer.model (sentencepiece) where
# the model class would insist on a BPE tokenizer.json of a known pre-tokenizer (qwen3moe, gpt-oss), which a
# tiny offline model cannot have. Tensors (names, layout, splits) are the converter's own.
_SPM_VOCAB = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base, conversion.gpt_oss
spm = lambda self: self._set_vocab_sentencepiece()
conversion.base.TextModel.set_vocab = conversion.gpt_oss.GptOssModel.set_vocab = spm
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def hf_to_gguf(hf_folder: Path, out: Path, outtype: str = "f32", spm_vocab: bool = False,
               extra: tuple[str, ...] = ()) -> Path:
    """extra: converter flags, e.g. --fuse-qkv or --no-mtp."""
    script = find_source_file("convert_hf_to_gguf.py")
    cmd = [sys.executable, "-c", _SPM_VOCAB, str(script.parent)] if spm_vocab else [sys.executable, str(script)]
    proc = subprocess.run(cmd + [str(hf_folder), "--outfile", str(out), "--outtype", outtype, *extra],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"convert_hf_to_gguf.py failed:\n{proc.stderr[-3000:]}"
    return out


def lora_to_gguf(adapter: Path, hf_base: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_lora_to_gguf.py, for comparison."""
    script = find_source_file("convert_lora_to_gguf.py")
    proc = subprocess.run([sys.executable, str(script), str(adapter), "--base", str(hf_base), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True)
    assert proc.returncode == 0, f"convert_lora_to_gguf.py failed:\n{proc.stderr[-3000:]}"
    return out


def llama_quantize(source: Path, out: Path, outtype: str, *options: str) -> Path:
    proc = subprocess.run([str(find_tool("llama-quantize")), *options, str(source), str(out), outtype.upper()],
                          capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, f"llama-quantize failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return out


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    """Same tensor names, types and bytes (metadata may differ: provenance keys)."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, (name, a[name].tensor_type.name, b[name].tensor_type.name)
        x, y = np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)
        if not np.array_equal(x, y):
            raise AssertionError(f"{name} ({a[name].tensor_type.name}): {int((x != y).sum())} of {x.size} bytes differ")


class Server:
    """llama-server on a free loopback port with a base and adapters; waits until ready."""

    def __init__(self, model: Path, loras: list[Path], log: Path, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(find_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "-c", "512", "-np", "1", "-t", "2", "--no-webui",
               "--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off", *extra]
        for lora in loras:
            cmd += ["--lora", str(lora)]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server not ready after 60 s:\n{log.read_text()[-3000:]}")

    def complete(self, prompt: list[int], scales: dict[int, float], n_predict: int = 6, n_probs: int = 5) -> list[dict]:
        """Greedy completion with an explicit adapter list (every adapter named; prompt cache off)."""
        body = {"prompt": prompt, "n_predict": n_predict, "n_probs": n_probs, "temperature": 0.0,
                "cache_prompt": False, "samplers": ["top_k"], "top_k": 1,
                "lora": [{"id": i, "scale": s} for i, s in sorted(scales.items())]}
        r = requests.post(self.url + "/completion", json=body, timeout=60)
        r.raise_for_status()
        return r.json()["completion_probabilities"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
