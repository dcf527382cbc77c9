"""Benchmark: `gguf-lora convert` against llama.cpp's own convert_lora_to_gguf.py (not a test).

Builds a synthetic ~1B llama-shaped base (config.json only) and a rank-16 PEFT adapter on all 7 projections
of all 16 layers, converts it to f16 GGUF with both tools (alternating, --repeat times), and prints the median
wall-clock seconds, peak RSS (from os.wait4) and the time ratio ours/theirs (goal: <= 0.25x). Finally it
checks that both outputs hold the same tensors with identical data, and exits non-zero if not.

Run:  just bench    or    .venv/bin/python bench/bench_convert.py [--work DIR] [--repeat N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file

from gguf_lora.llama_cpp import find_source_file

ROOT = Path(__file__).resolve().parent.parent
# the console script beside the running interpreter (the venv's), else the repository's .venv
GGUF_LORA = next((p for p in (Path(sys.executable).parent / "gguf-lora", ROOT / ".venv" / "bin" / "gguf-lora")
                  if p.exists()), ROOT / ".venv" / "bin" / "gguf-lora")
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
          "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16"}
RANK = 16
H, FF, KV = 2048, 8192, 8 * 64
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, KV), "self_attn.v_proj": (H, KV),  # (in, out)
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (H, FF), "mlp.up_proj": (H, FF), "mlp.down_proj": (FF, H)}


def machine_facts() -> dict:
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def machine_line(machine: dict, repeat: int) -> str:
    return f"machine: nproc={machine['nproc']}  python={machine['python']}  {machine['platform']}  (median of {repeat})"


def make_inputs(work: Path) -> tuple[Path, Path]:
    base, adapter = work / "base", work / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False},
        indent=2))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for module, (n_in, n_out) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((RANK, n_in)) * 0.02).astype(np.float16)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((n_out, RANK)) * 0.02).astype(np.float16)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return base, adapter


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall-clock seconds and peak RSS (MiB) of one child process; exits loudly if it fails."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    if code != 0:
        sys.exit(f"FAILED ({code}): {' '.join(cmd)}\n--- output tail ---\n{log.read_text(errors='replace')[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024


def compare(ours: Path, theirs: Path) -> str | None:
    """None if both files hold the same tensor names with equal data, else the first difference."""
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    if a.keys() != b.keys():
        return f"tensor names differ: only ours {sorted(a.keys() - b.keys())[:5]}, only theirs {sorted(b.keys() - a.keys())[:5]}"
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.tensor_type != y.tensor_type or x.data.shape != y.data.shape:
            return f"{name}: ours {x.tensor_type.name} {x.data.shape}, theirs {y.tensor_type.name} {y.data.shape}"
        if not np.array_equal(x.data, y.data):
            diff = np.abs(x.data.astype(np.float64) - y.data.astype(np.float64))
            return f"{name}: data differs at {int((diff > 0).sum())} of {diff.size} values, max |diff| {diff.max():.3g}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out", help="work folder (reused if present)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter = make_inputs(args.work)
    ours_out, theirs_out = args.work / "ours.gguf", args.work / "theirs.gguf"
    cmds = {
        "gguf-lora": [str(GGUF_LORA), "convert", str(adapter), "--base", str(base), "-o", str(ours_out),
                      "--outtype", "f16", "--force"],
        "llama.cpp": [sys.executable, str(find_source_file("convert_lora_to_gguf.py")), str(adapter),
                      "--base", str(base), "--outfile", str(theirs_out), "--outtype", "f16"],
    }
    times: dict[str, list[float]] = {name: [] for name in cmds}
    rss: dict[str, float] = {name: 0.0 for name in cmds}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            theirs_out.unlink(missing_ok=True)  # it may refuse to overwrite
            seconds, peak = run(cmd, args.work / f"{name}.log")
            times[name].append(seconds)
            rss[name] = max(rss[name], peak)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = median["gguf-lora"] / median["llama.cpp"]
    mismatch = compare(ours_out, theirs_out)
    report = {"machine": machine_facts(),
              "repeat": args.repeat,
              "tools": {name: {"median_s": round(median[name], 3), "runs_s": [round(t, 3) for t in times[name]],
                               "peak_rss_mib": round(rss[name], 1)} for name in cmds},
              "time_ratio_ours_over_theirs": round(ratio, 3), "goal_met": ratio <= 0.25,
              "outputs_match": mismatch is None, "first_mismatch": mismatch}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(machine_line(report["machine"], args.repeat))
        print(f"{'tool':<10} {'median s':>9} {'peak RSS MiB':>13}")
        for name in cmds:
            print(f"{name:<10} {median[name]:>9.3f} {rss[name]:>13.1f}")
        print(f"time ratio ours/theirs: {ratio:.3f}x  (goal <= 0.25x: {'met' if ratio <= 0.25 else 'NOT met'})")
        print("outputs match: yes" if mismatch is None else f"outputs match: NO - first mismatch: {mismatch}")
    if mismatch is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
