"""Benchmark: every figure of issue 13 in one run, side by side with llama.cpp's tools (not a test).

  1B synthetic llama (bench_merge.py's): PEFT -> merged Q8_0 and Q4_K_M with `gguf-lora merge` vs
     convert_lora_to_gguf.py + llama-export-lora + llama-quantize; `gguf-lora quantize` F16 -> Q4_K_M vs
     llama-quantize with the same threads (bytes must be identical); the Q8_0 merge against its floor
     (reading the base once and writing the result once, measured here with plain file I/O).
  8B shapes (hidden 4096, ffn 14336, 32/8 heads, vocab 128256, --layers layers): merge into the F16 base ->
     Q4_K_M, and into a Q4_K_M base (made by llama-quantize) with --outtype same vs export-lora then
     llama-quantize --allow-requantize; peak RSS of our process (its VmHWM, polled) and seconds per GB
     of output against the 1B figure.
  CLI start-up: commands that touch no tensors, best of --startup-runs (and `python -c pass` for scale).

Ratios are ours/theirs, measured alternating in the same run; every run's ratio is printed so that the
noise shows. Inputs are built once in --work (default bench/out, gitignored; ~25 GB at the defaults).

Run:  just bench    or    .venv/bin/python bench/bench_speed.py [--repeat N] [--repeat-8b N] [--layers N]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import GGUF_LORA, ROOT, machine_facts, machine_line  # noqa: E402
from bench_merge import (GOALS, RSS_GOAL_MIB, THREADS, merge_pipelines, prepare, print_merge,  # noqa: E402
                         print_quantize, quantize_only)

STARTUP_GOAL_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(work: Path, runs: int) -> dict:
    """Wall seconds of commands that touch no tensors (best and median of runs)."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the command fails fast after its one request
    cmds = {
        "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
        "gguf-lora --help": [str(GGUF_LORA), "--help"],
        "gguf-lora adapters use NAME": [str(GGUF_LORA), "adapters", "use", "sql", "--url", url],
        "gguf-lora adapters list": [str(GGUF_LORA), "adapters", "list", "--url", url],
        "gguf-lora modelfile": [str(GGUF_LORA), "modelfile", "--from", "llama3.2:1b", "-o", str(work / "Modelfile"),
                                "--force"],
        "gguf-lora serve (arguments, no launch)": [str(GGUF_LORA), "serve", "--base", str(work / "missing.gguf")],
        "python -c 'import gguf_lora'": [sys.executable, "-c", "import gguf_lora"],
    }
    out = {}
    for name, cmd in cmds.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        out[name] = {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
    return out


def floor(base: Path, out_bytes: int, work: Path) -> float:
    """Seconds to read the base once and write out_bytes once (fsynced, as the merge does): the I/O floor."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    target = work / "floor.bin"
    start = time.perf_counter()
    with open(base, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left:
            left -= f.write(view[:min(left, len(buf))])
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out", help="work folder (reused if present)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each 1B pipeline (alternating)")
    parser.add_argument("--repeat-8b", type=int, default=1, help="runs of each 8B-shape pipeline")
    parser.add_argument("--layers", type=int, default=2, help="layers of the 8B-shape model")
    parser.add_argument("--startup-runs", type=int, default=7)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, choices=["q8_0", "q4_k_m", "quantize", "8b"],
                        help="measure only these parts (default: all); the table shows what was measured")
    parser.add_argument("--json", type=Path, default=None, help="also write the whole report here")
    args = parser.parse_args()
    work1, work8 = args.work / "1b", args.work / "8b"
    work1.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_facts(), "threads": int(THREADS), "repeat": args.repeat,
                    "repeat_8b": args.repeat_8b, "layers_8b": args.layers}
    print(machine_line(report["machine"], args.repeat), flush=True)

    def want(part: str) -> bool:
        return args.only is None or part in args.only

    report["startup"] = startup(work1, args.startup_runs)
    m8 = m4 = q4 = e4 = es = None
    fl = 0.0
    config_dir, adapter, base = prepare(work1, "1b", None)
    if want("q8_0"):
        print("\n== 1B: PEFT -> merged Q8_0", flush=True)
        report["merge_q8_0"] = m8 = merge_pipelines(work1, base, adapter, config_dir, "q8_0", args.repeat)
        print_merge(m8, GOALS["q8_0"][0])
        report["floor_q8_0_s"] = fl = round(floor(base, m8["output_bytes"], work1), 3)
        print(f"floor (read the base once, write the result once): {fl:.3f} s; ours is "
              f"{m8['ours']['median_s'] / fl:.2f}x the floor", flush=True)
    if want("q4_k_m"):
        print("\n== 1B: PEFT -> merged Q4_K_M", flush=True)
        report["merge_q4_k_m"] = m4 = merge_pipelines(work1, base, adapter, config_dir, "q4_k_m", args.repeat)
        print_merge(m4, GOALS["q4_k_m"][0])
    if want("quantize"):
        print("\n== 1B: quantize F16 -> Q4_K_M", flush=True)
        report["quantize_q4_k_m"] = q4 = quantize_only(work1, base, "q4_k_m", args.repeat)
        print_quantize(q4, GOALS["q4_k_m"][1])
        for p in work1.glob("q-*.gguf"):
            p.unlink()
    if want("8b") and not args.skip_8b:
        print(f"\n== 8B shapes ({args.layers} layers): F16 base -> merged Q4_K_M", flush=True)
        config_dir8, adapter8, base8 = prepare(work8, "8b", args.layers)
        report["merge_8b_q4_k_m"] = e4 = merge_pipelines(work8, base8, adapter8, config_dir8, "q4_k_m",
                                                         args.repeat_8b, values=False)
        print_merge(e4, GOALS["q4_k_m"][0])
        print(f"\n== 8B shapes ({args.layers} layers): Q4_K_M base -> merged, --outtype same", flush=True)
        _, _, base8q = prepare(work8, "8b", args.layers, "q4_k_m")
        report["merge_8b_same"] = es = merge_pipelines(work8, base8q, adapter8, config_dir8, "same", args.repeat_8b,
                                                       values=False)
        print_merge(es, GOALS["same"][0])
        for p in work8.glob("*-q4_k_m.gguf"):
            if p.name.startswith(("ours-", "theirs-")):
                p.unlink()

    rows = [("figure", "ours", "llama.cpp", "ratio", "goal", "")]

    def pipeline_row(label: str, m: dict, goal: float) -> None:
        rows.append((label, f"{m['ours']['median_s']:.2f} s", f"{m['theirs']['median_s']:.2f} s",
                     f"{m['ratio']:.3f}x {m['ratio_per_run']}", f"<= {goal}x", verdict(m["ratio"] <= goal)))

    def rss_row(m: dict, goal: int | None) -> None:
        rows.append(("  peak RSS", f"{m['ours']['peak_rss_mib']:.0f} MiB", f"{m['theirs']['peak_rss_mib']:.0f} MiB",
                     "", "report" if goal is None else f"<= {goal} MiB",
                     verdict(None if goal is None else m["ours"]["peak_rss_mib"] <= goal)))

    if m8:
        pipeline_row("PEFT -> merged Q8_0 (1B)", m8, GOALS["q8_0"][0])
        rows.append(("  Q8_0 merge vs its I/O floor", f"{m8['ours']['median_s']:.2f} s", f"floor {fl:.2f} s",
                     f"{m8['ours']['median_s'] / fl:.2f}x the floor", "report", "-"))
        rss_row(m8, None)
    if m4:
        pipeline_row("PEFT -> merged Q4_K_M (1B)", m4, GOALS["q4_k_m"][0])
        rss_row(m4, None)
        rows.append(("  seconds per GB of output", f"{m4['ours_s_per_gb']} s/GB", "", "", "report", "-"))
    if q4:
        rows.append((f"quantize F16 -> Q4_K_M (1B, {THREADS} threads)", f"{q4['ours']['median_s']:.2f} s",
                     f"{q4['theirs']['median_s']:.2f} s", f"{q4['ratio']:.3f}x {q4['ratio_per_run']}",
                     f"<= {GOALS['q4_k_m'][1]}x, same bytes",
                     verdict(q4["ratio"] <= GOALS["q4_k_m"][1] and q4["byte_identical"])))
    if e4 and es:
        pipeline_row(f"8B shapes: F16 -> merged Q4_K_M ({args.layers} layers)", e4, GOALS["q4_k_m"][0])
        rss_row(e4, RSS_GOAL_MIB)
        rows.append(("  seconds per GB of output", f"{e4['ours_s_per_gb']} s/GB", "",
                     f"1B: {m4['ours_s_per_gb']} s/GB" if m4 else "", "<= the 1B figure",
                     verdict(e4["ours_s_per_gb"] <= m4["ours_s_per_gb"]) if m4 else "-"))
        pipeline_row(f"8B shapes: Q4_K_M base, --outtype same ({args.layers} layers)", es, GOALS["same"][0])
        rss_row(es, RSS_GOAL_MIB)
        rows.append(("  seconds per GB of output", f"{es['ours_s_per_gb']} s/GB", "", "", "report", "-"))
    for name, r in report["startup"].items():
        goal = None if name.startswith("python") else r["best_s"] <= STARTUP_GOAL_S
        rows.append((f"start-up: {name}", f"{r['best_s']:.3f} s", "", f"median {r['median_s']:.3f} s",
                     "-" if goal is None else f"<= {STARTUP_GOAL_S} s", verdict(goal)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n== issue 13: all figures (ratios ours/theirs, median of the runs; per-run ratios in brackets)")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    layouts = [m["outputs"]["layout_match"] for k, m in report.items() if k.startswith("merge_")]
    if not all(layouts) or (q4 and not q4["byte_identical"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
