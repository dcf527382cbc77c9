"""Benchmark: switching adapters on a running llama-server vs restarting it with the other adapter (not a test).

On the synthetic ~1B llama-shaped F16 base of bench_merge.py with two rank-16 all-linear GGUF LoRAs
(converted by gguf-lora from bench_convert.py's PEFT adapter), under a managed llama-server
(`gguf-lora serve`'s configuration), it times:
  switch (global):    POST /lora-adapters alone, and LlamaServer.use() (POST + read back), alternating A/B
  switch (per request): a 1-token completion on a 32-token prompt whose adapter differs from the previous
                        request's (the prompt is recomputed) vs the same adapter (prompt cache reused)
  restart:            stop the server, start it with the other adapter, wait until ready and scales set
and prints p50 / p99 / max in ms, the goal (switch p99 < 50 ms) and switch/restart as a ratio.

Run:  just bench    or    .venv/bin/python bench/bench_switch.py [--work DIR] [--switches N] [--restarts N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import ROOT, machine_facts, machine_line, make_inputs  # noqa: E402
from bench_merge import THREADS, make_base_gguf  # noqa: E402

from gguf_lora import convert  # noqa: E402
from gguf_lora.runtime.llama_server import ManagedServer  # noqa: E402

GOAL_MS = 50.0
EXTRA = ["-c", "512", "-np", "1", "-t", THREADS]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summary(name: str, ms: list[float]) -> str:
    return f"{name:<34} p50 {pct(ms, 0.5):8.2f} ms   p99 {pct(ms, 0.99):8.2f} ms   max {max(ms):8.2f} ms   (n={len(ms)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--switches", type=int, default=400)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--restarts", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = make_base_gguf(args.work)
    _, peft = make_inputs(args.work)
    folder = args.work / "switch"
    folder.mkdir(exist_ok=True)
    adapters = []
    for name in ("a", "b"):
        out = folder / f"{name}.gguf"
        if not out.is_file():
            convert(peft, base, out)
        adapters.append(out)
    print(machine_line(machine_facts(), 1).replace("(median of 1)", ""))
    print(f"base {base.name} ({base.stat().st_size / 2**30:.2f} GiB F16), adapters a, b (rank 16, all-linear)")

    server = ManagedServer(base, adapters, extra_args=EXTRA, log=folder / "llama-server.log", ready_timeout=600)
    t0 = time.perf_counter()
    client = server.start()
    cold = (time.perf_counter() - t0) * 1000
    try:
        session = requests.Session()
        post, use = [], []
        for i in range(args.switches):
            body = [{"id": i % 2, "scale": 1.0}, {"id": 1 - i % 2, "scale": 0.0}]
            t = time.perf_counter()
            session.post(client.url + "/lora-adapters", json=body, timeout=30).raise_for_status()
            post.append((time.perf_counter() - t) * 1000)
        for i in range(args.switches):
            t = time.perf_counter()
            client.use("ab"[i % 2])
            use.append((time.perf_counter() - t) * 1000)
        prompt = list(range(3, 35))  # 32 token ids
        same, switched = [], []
        client.complete(prompt, adapter="a", n_predict=1)
        for i in range(args.requests):
            t = time.perf_counter()
            client.complete(prompt, adapter="a", n_predict=1)
            same.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            client.complete(prompt, adapter="b", n_predict=1)
            switched.append((time.perf_counter() - t) * 1000)
            client.complete(prompt, adapter="a", n_predict=1)
    finally:
        server.close()
    restarts = [cold]
    for i in range(args.restarts):
        t = time.perf_counter()
        with ManagedServer(base, adapters, extra_args=EXTRA, log=folder / "restart.log", ready_timeout=600,
                           scales="ab"[i % 2]):
            restarts.append((time.perf_counter() - t) * 1000)
    print(summary("switch: POST /lora-adapters", post))
    print(summary("switch: LlamaServer.use (+verify)", use))
    print(summary("request, same adapter (cache)", same))
    print(summary("request, other adapter", switched))
    print(summary("restart with the other adapter", restarts))
    p99 = pct(use, 0.99)
    print(f"goal: switch p99 < {GOAL_MS:g} ms -> {p99:.2f} ms ({'met' if p99 < GOAL_MS else 'NOT met'}); "
          f"switch/restart = {p99 / statistics.median(restarts):.5f}x")


if __name__ == "__main__":
    main()
