"""Benchmark: `gguf-lora merge` / `quantize` against llama.cpp's own tools (not a test).

Builds (once, reused from the work folder) a synthetic llama-shaped F16 base GGUF written with gguf-py, its
config.json and a rank-16 PEFT adapter on all 7 projections of every layer: the ~1B model of
bench_convert.py (hidden 2048, 16 layers, vocab 32000), or with --shape 8b Llama-3.1-8B's dimensions (hidden
4096, ffn 14336, 32/8 heads, vocab 128256) with --layers layers. Then times, alternating, --repeat times:
  ours:   gguf-lora merge --base BASE ADAPTER -o ours-TYPE.gguf --outtype TYPE
  theirs: convert_lora_to_gguf.py (f16) -> llama-export-lora (F16 merge) -> llama-quantize TYPE
          (wall times summed, peak RSS the max over the steps)
  and quantize alone: gguf-lora quantize BASE TYPE vs llama-quantize BASE TYPE (outputs must be byte-identical)
With --base-type q4_k_m the base is first quantized by llama-quantize (the Ollama-store case) and ours merges
with --outtype same, theirs is export-lora then llama-quantize --allow-requantize.
Prints the median seconds, peak RSS (the child's VmHWM, polled from /proc), the ratios ours/theirs against
the goals of issue 13 and seconds per GB of output. The merged outputs must hold the same tensor names and
types (exit non-zero if not); their data differ (llama.cpp merges into F16 and rounds twice), which is
reported, not failed. bench_speed.py runs every configuration in one go and prints the issue's table.

Run:  .venv/bin/python bench/bench_merge.py [--outtype q8_0|q4_k_m] [--shape 1b|8b] [--work DIR] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import dequantize
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import CONFIG, GGUF_LORA, ROOT, machine_facts, machine_line  # noqa: E402

from gguf_lora.llama_cpp import find_source_file, find_tool  # noqa: E402

THREADS = str(os.cpu_count() or 2)
RANK = 16
CONFIG_8B = {**CONFIG, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0}
# issue 13's goals: merge pipeline ratio per outtype, quantize-alone ratio (same threads)
GOALS = {"q8_0": (0.30, None), "q4_k_m": (0.60, 1.0), "q5_k_m": (0.60, 1.0), "q4_0": (0.30, None),
         "same": (0.60, None)}
RSS_GOAL_MIB = 1536  # 1.5 GiB, the 8B-shape goal


def run(cmd: list[str], log: Path, poll: float = 0.02) -> tuple[float, float]:
    """Wall-clock seconds and peak RSS (MiB) of one child process; exits loudly if it fails.

    The peak is the child's own VmHWM, polled from /proc while it runs. Its ru_maxrss (os.wait4,
    RUSAGE_CHILDREN) is no good here: Linux carries the high-water mark of the memory image a child was
    forked from across exec, so every child would report at least this process's own peak (2.6 GB once it
    has compared two models)."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        status, peak_kib = Path(f"/proc/{proc.pid}/status"), 0
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(poll)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n--- output tail ---\n"
                 f"{log.read_text(errors='replace')[-3000:]}")
    return elapsed, peak_kib / 1024


def config_for(shape: str, layers: int | None = None) -> dict:
    config = dict(CONFIG if shape == "1b" else CONFIG_8B)
    if layers:
        config["num_hidden_layers"] = layers
    return config


def dims(config: dict) -> tuple[int, int, int]:
    h = config["hidden_size"]
    return h, config["intermediate_size"], config["num_key_value_heads"] * (h // config["num_attention_heads"])


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """GGUF tensor kind -> numpy (rows, cols)."""
    h, ff, kv = dims(config)
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}


def peft_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in, out)."""
    h, ff, kv = dims(config)
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, ff), "mlp.up_proj": (h, ff), "mlp.down_proj": (ff, h)}


def make_inputs(work: Path, config: dict) -> tuple[Path, Path]:
    """config.json (the base for convert_lora_to_gguf.py) and a rank-16 PEFT adapter on all 7 projections."""
    base, adapter = work / "base", work / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "use_rslora": False,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False},
        indent=2))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for module, (n_in, n_out) in peft_shapes(config).items():
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((RANK, n_in)) * 0.02).astype(np.float16)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((n_out, RANK)) * 0.02).astype(np.float16)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return base, adapter


def base_tensors(config: dict) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, numpy shape, dtype) in the order convert_hf_to_gguf.py writes a llama model."""
    h, vocab = config["hidden_size"], config["vocab_size"]
    out = [("token_embd.weight", (vocab, h), np.float16)]
    for i in range(config["num_hidden_layers"]):
        out += [(f"blk.{i}.attn_norm.weight", (h,), np.float32), (f"blk.{i}.ffn_norm.weight", (h,), np.float32)]
        out += [(f"blk.{i}.{kind}.weight", shape, np.float16) for kind, shape in layer_shapes(config).items()]
    return out + [("output_norm.weight", (h,), np.float32), ("output.weight", (vocab, h), np.float16)]


def make_base_gguf(work: Path, config: dict = CONFIG) -> Path:
    """The synthetic F16 base, streamed in row slices (written to a .tmp name, renamed when complete)."""
    path = work / "base-f16.gguf"
    if path.is_file():
        return path
    tmp = path.with_suffix(".gguf.tmp")
    vocab, h, n_layers = config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]
    w = GGUFWriter(tmp, "llama")
    w.add_name(f"bench-merge synthetic llama h{h} x{n_layers}")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(h // config["num_attention_heads"])
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(vocab)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, vocab)]
    types = np.full(vocab, TokenType.NORMAL, dtype=np.int32)
    types[0], types[1:3] = TokenType.UNKNOWN, TokenType.CONTROL
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(np.zeros(vocab, dtype=np.float32).tolist())
    w.add_token_types(types.tolist())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    specs = base_tensors(config)
    for name, shape, dtype in specs:
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    rng = np.random.default_rng(0)
    for name, shape, dtype in specs:  # row slices: the 8B embedding would be 2 GB of float32 at once
        f.write(b"\0" * (-f.tell() % w.data_alignment))
        step = max(1, (1 << 24) // shape[-1])
        for start in range(0, shape[0], step):
            part = (min(step, shape[0] - start),) + tuple(shape[1:])
            f.write((rng.standard_normal(part, dtype=np.float32) * np.float32(0.02)).astype(dtype).tobytes())
    f.write(b"\0" * (-f.tell() % w.data_alignment))
    w.close()
    tmp.rename(path)
    return path


def make_quantized_base(work: Path, base: Path, qtype: str) -> Path:
    """The base as llama-quantize writes it (what an Ollama store holds)."""
    path = work / f"base-{qtype}.gguf"
    if not path.is_file():
        tmp = path.with_suffix(".gguf.tmp")
        tmp.unlink(missing_ok=True)
        run([str(find_tool("llama-quantize")), str(base), str(tmp), qtype.upper(), THREADS], work / "make-base.log")
        tmp.rename(path)
    return path


def compare(ours: Path, theirs: Path, rows: int = 1024, values: bool = True) -> dict:
    """Same names and types? How many tensors are byte-identical, and how far apart (dequantized) are the rest."""
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    if a.keys() != b.keys():
        return {"layout_match": False, "layout_mismatch": f"tensor names differ: only ours "
                f"{sorted(a.keys() - b.keys())[:5]}, only theirs {sorted(b.keys() - a.keys())[:5]}"}
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.tensor_type != y.tensor_type or x.data.shape != y.data.shape:
            return {"layout_match": False, "layout_mismatch": f"{name}: ours {x.tensor_type.name} {x.data.shape}, "
                    f"theirs {y.tensor_type.name} {y.data.shape}"}
    identical, max_diff, worst, n_diff, n_values = 0, 0.0, None, 0, 0
    for name in a:  # in file order
        x, y = a[name], b[name]
        if np.array_equal(x.data, y.data):
            identical += 1
            continue
        if not values:
            continue
        for start in range(0, x.data.shape[0], rows):  # row blocks: bounded memory for the big tensors
            dx = dequantize(x.data[start:start + rows], x.tensor_type).astype(np.float64)
            dy = dequantize(y.data[start:start + rows], y.tensor_type).astype(np.float64)
            diff = np.abs(dx - dy)
            n_diff += int((diff > 0).sum())
            n_values += diff.size
            if diff.max() > max_diff:
                max_diff, worst = float(diff.max()), name
    types: dict[str, int] = {}
    for t in a.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"layout_match": True, "tensors": len(a), "types": types, "byte_identical_tensors": identical,
            "differing_tensors": len(a) - identical, "max_abs_diff": max_diff if values else None, "worst_tensor": worst,
            "differing_values_in_differing_tensors": n_diff, "values_in_differing_tensors": n_values}


def timed(runs: list[tuple[float, float]]) -> dict:
    seconds = [s for s, _ in runs]
    return {"median_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
            "peak_rss_mib": round(max(r for _, r in runs), 1)}


def merge_pipelines(work: Path, base: Path, adapter: Path, config_dir: Path, outtype: str, repeat: int,
                    tag: str = "", values: bool = True) -> dict:
    """ours (one merge) vs llama.cpp's three steps, alternating, repeat times. outtype 'same' keeps the base's
    types (theirs then re-quantizes to the base's file type with --allow-requantize)."""
    tag = tag or outtype
    ours_out, lora, merged, theirs_out = (work / f"ours-{tag}.gguf", work / "lora.gguf", work / "merged-f16.gguf",
                                          work / f"theirs-{tag}.gguf")
    ours_cmd = [str(GGUF_LORA), "merge", "--base", str(base), str(adapter), "-o", str(ours_out),
                "--outtype", outtype, "--force"]
    target = base_ftype(base) if outtype == "same" else outtype
    quantize_cmd = [str(find_tool("llama-quantize"))] + (["--allow-requantize"] if outtype == "same" else [])
    steps = {
        "convert_lora_to_gguf.py": [sys.executable, str(find_source_file("convert_lora_to_gguf.py")), str(adapter),
                                    "--base", str(config_dir), "--outfile", str(lora), "--outtype", "f16"],
        "llama-export-lora": [str(find_tool("llama-export-lora")), "-m", str(base), "--lora", str(lora),
                              "-o", str(merged), "-t", THREADS],
        "llama-quantize": quantize_cmd + [str(merged), str(theirs_out), target.upper(), THREADS],
    }
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    step_runs: dict[str, list[tuple[float, float]]] = {s: [] for s in steps}
    for _ in range(repeat):
        ours.append(run(ours_cmd, work / f"merge-gguf-lora-{tag}.log"))
        for path in (lora, merged, theirs_out):
            path.unlink(missing_ok=True)  # they may refuse to overwrite
        total, peak = 0.0, 0.0
        for step, cmd in steps.items():
            seconds, rss = run(cmd, work / f"merge-{step}-{tag}.log")
            step_runs[step].append((seconds, rss))
            total, peak = total + seconds, max(peak, rss)
        theirs.append((total, peak))
    for path in (lora, merged):
        path.unlink(missing_ok=True)
    ratios = [o[0] / t[0] for o, t in zip(ours, theirs)]
    out_bytes = ours_out.stat().st_size
    o, t = timed(ours), timed(theirs)
    return {"outtype": outtype, "target_type": target, "ours": o, "theirs": {**t, "steps": {s: timed(r) for s, r in
                                                                                             step_runs.items()}},
            "ratio": round(o["median_s"] / t["median_s"], 3), "ratio_per_run": [round(r, 3) for r in ratios],
            "output_bytes": out_bytes, "ours_s_per_gb": round(o["median_s"] / (out_bytes / 1e9), 2),
            "outputs": compare(ours_out, theirs_out, values=values)}


def quantize_only(work: Path, base: Path, outtype: str, repeat: int) -> dict:
    q_ours, q_theirs = work / f"q-ours-{outtype}.gguf", work / f"q-theirs-{outtype}.gguf"
    cmds = {"gguf-lora quantize": [str(GGUF_LORA), "quantize", str(base), str(q_ours), outtype, "--force"],
            "llama-quantize": [str(find_tool("llama-quantize")), str(base), str(q_theirs), outtype.upper(), THREADS]}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(repeat):
        q_theirs.unlink(missing_ok=True)
        for name, cmd in cmds.items():
            runs[name].append(run(cmd, work / f"quantize-{name.split()[0]}-{outtype}.log"))
    check = compare(q_ours, q_theirs)
    o, t = timed(runs["gguf-lora quantize"]), timed(runs["llama-quantize"])
    ratios = [a[0] / b[0] for a, b in zip(runs["gguf-lora quantize"], runs["llama-quantize"])]
    return {"outtype": outtype, "ours": o, "theirs": t, "ratio": round(o["median_s"] / t["median_s"], 3),
            "ratio_per_run": [round(r, 3) for r in ratios], "threads": int(THREADS),
            "byte_identical": check["layout_match"] and check["differing_tensors"] == 0}


def base_ftype(base: Path) -> str:
    """The llama-quantize type name of a base from its general.file_type."""
    ftype = int(GGUFReader(base).fields["general.file_type"].contents())
    return LlamaFileType(ftype).name.removeprefix("MOSTLY_").lower()


def prepare(work: Path, shape: str, layers: int | None, base_type: str = "f16") -> tuple[Path, Path, Path]:
    """(config folder, adapter, base GGUF) for a shape, built once in work."""
    config = config_for(shape, layers)
    work.mkdir(parents=True, exist_ok=True)
    config_dir, adapter = make_inputs(work, config)
    base = make_base_gguf(work, config)
    if base_type != "f16":
        base = make_quantized_base(work, base, base_type)
    return config_dir, adapter, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="work folder (reused if present; default "
                        "bench/out for 1b, bench/out-8b for 8b)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per pipeline; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--outtype", default="q8_0", choices=sorted(GOALS), help="output type of both pipelines")
    parser.add_argument("--shape", default="1b", choices=["1b", "8b"])
    parser.add_argument("--layers", type=int, default=None, help="layers of the synthetic model")
    parser.add_argument("--base-type", default="f16", choices=["f16", "q4_k_m"], help="type of the base")
    parser.add_argument("--no-quantize", action="store_true", help="skip quantize alone")
    args = parser.parse_args()
    work = args.work or ROOT / "bench" / ("out" if args.shape == "1b" else "out-8b")
    config_dir, adapter, base = prepare(work, args.shape, args.layers, args.base_type)
    merged = merge_pipelines(work, base, adapter, config_dir, args.outtype, args.repeat)
    quant = None if args.no_quantize or GOALS[args.outtype][1] is None or args.base_type != "f16" else \
        quantize_only(work, base, args.outtype, args.repeat)
    report = {"machine": machine_facts(), "repeat": args.repeat, "threads_llama_cpp": int(THREADS), "shape": args.shape,
              "base": base.name, "merge": merged, "merge_goal": GOALS[args.outtype][0], "quantize_only": quant,
              "quantize_goal": GOALS[args.outtype][1]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(machine_line(report["machine"], args.repeat))
        print_merge(merged, GOALS[args.outtype][0])
        if quant:
            print_quantize(quant, GOALS[args.outtype][1])
    if not merged["outputs"]["layout_match"] or (quant and not quant["byte_identical"]):
        sys.exit(1)


def print_merge(m: dict, goal: float) -> None:
    o, t = m["ours"], m["theirs"]
    print(f"{'pipeline':<34} {'median s':>9} {'peak RSS MiB':>13}")
    print(f"{'gguf-lora merge ' + m['outtype']:<34} {o['median_s']:>9.3f} {o['peak_rss_mib']:>13.1f}")
    print(f"{'llama.cpp (3 steps)':<34} {t['median_s']:>9.3f} {t['peak_rss_mib']:>13.1f}")
    for s, r in t["steps"].items():
        print(f"{'  ' + s:<34} {r['median_s']:>9.3f} {r['peak_rss_mib']:>13.1f}")
    print(f"time ratio ours/theirs: {m['ratio']:.3f}x per run {m['ratio_per_run']}  "
          f"(goal <= {goal}x: {'met' if m['ratio'] <= goal else 'NOT met'}); "
          f"{m['ours_s_per_gb']} s per GB of output")
    c = m["outputs"]
    if not c["layout_match"]:
        print(f"outputs: tensor names/types DIFFER - {c['layout_mismatch']}")
        return
    types = ", ".join(f"{n} {k}" for k, n in sorted(c["types"].items()))
    print(f"outputs: same {c['tensors']} tensor names and types ({types}); "
          f"{c['byte_identical_tensors']} byte-identical, {c['differing_tensors']} differ")
    if c["differing_tensors"] and c["max_abs_diff"] is not None:
        print(f"  differing tensors, dequantized: max |diff| {c['max_abs_diff']:.3g} (in {c['worst_tensor']}); "
              f"{c['differing_values_in_differing_tensors']} of {c['values_in_differing_tensors']} values differ")


def print_quantize(q: dict, goal: float | None) -> None:
    for k, r in (("gguf-lora quantize", q["ours"]), ("llama-quantize", q["theirs"])):
        print(f"{k + ' (F16 -> ' + q['outtype'] + ')':<40} {r['median_s']:>9.3f} s {r['peak_rss_mib']:>9.1f} MiB")
    verdict = "no goal set" if goal is None else f"goal <= {goal}x: {'met' if q['ratio'] <= goal else 'NOT met'}"
    print(f"quantize ratio ours/theirs: {q['ratio']:.3f}x per run {q['ratio_per_run']} ({verdict}); "
          f"byte-identical: {q['byte_identical']}")


if __name__ == "__main__":
    main()
