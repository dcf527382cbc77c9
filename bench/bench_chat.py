"""Benchmark: a growing chat through the router (prompt cache on) vs the previous `serve` (cache off); the
router's own cost per request and per streamed token (not a test).

On a synthetic ~100M-parameter llama (hidden 768, 16 layers, the byte-fallback tokenizer and ChatML template of
tests/tiny.py; base GGUF written by llama.cpp's convert_hf_to_gguf.py, F16) with one rank-16 GGUF LoRA:
  chat:      an 8-turn conversation (user turns of ~90 tokens, answers of --answer tokens, the history
             growing to ~1,500 tokens), each turn a non-streamed /v1/chat/completions with the whole history,
             timed at the client. "router": `gguf-lora serve` now (model="chat", prompt cache on, exact).
             "no cache": the previous serve configuration (--no-cache-prompt, `adapters use chat`, a request
             without an adapter field, as an OpenAI client sent it). --repeat conversations, each with other
             words (so no run reuses another's cache), same for both; per-turn medians of the turn's time
             and of llama-server's prompt time (what a streaming user waits before the first token).
  overhead:  a 1-token chat request, alternately through the router and straight to its llama-server (same
             process, same adapter list, cache on); p50 of the paired differences.
  stream:    a --stream-tokens answer streamed through the router and straight from llama-server, in
             pairs (the order alternating); tokens/s between the first and the last token; median ratio.
Goals (issue 12): last turns >= 3x faster; overhead <= 2 ms p50; streamed tokens/s within 3%.

Run:  .venv/bin/python bench/bench_chat.py [--work DIR] [--repeat N] [--answer N]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench_convert import ROOT, machine_facts, machine_line  # noqa: E402

from gguf_lora import convert  # noqa: E402
from gguf_lora.runtime.llama_server import ManagedServer  # noqa: E402
from gguf_lora.runtime.router import Router  # noqa: E402

SHAPE = dict(vocab_size=384, hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=4096, initializer_range=0.02)
TURNS = 8
# One thread: on a shared, busy machine two llama.cpp threads spin-wait on each other (seconds per token).
EXTRA = ["-c", "4096", "-np", "1", "-t", "1"]


def make_model(work: Path) -> tuple[Path, Path, int]:
    """The base GGUF (llama.cpp's converter), a folder with one GGUF LoRA named chat.gguf, the parameter count."""
    import tiny
    from llamacpp import hf_to_gguf

    hf, base, folder = work / "hf", work / "base.gguf", work / "adapters"
    if not base.is_file():
        model = tiny.make_base("llama", hf, **SHAPE)
        (hf / "tokenizer.model").write_bytes(tiny.sentencepiece_model(SHAPE["vocab_size"], chat=True))
        (hf / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer",
            "chat_template": tiny.CHATML, "eos_token": "<|im_end|>"}))
        del model
        hf_to_gguf(hf, base, outtype="f16")
    if not (folder / "chat.gguf").is_file():
        peft = tiny.make_adapter(hf, work / "peft", r=16, lora_alpha=32)
        folder.mkdir(exist_ok=True)
        convert(peft, base, folder / "chat.gguf")
    cfg = json.loads((hf / "config.json").read_text())
    h, f, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    params = n * (2 * h * h + 2 * h * kv + 3 * h * f) + 2 * v * h
    return base, folder, params


def user_turns(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijkl") for _ in range(rng.randint(1, 6))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(45)) for _ in range(TURNS)]


def chat(url: str, headers: dict, seed: int, answer: int, extra: dict) -> list[tuple[float, int, int, float]]:
    """One conversation; per turn (seconds, prompt tokens, prompt tokens evaluated, prompt seconds)."""
    history, out = [], []
    for text in user_turns(seed):
        history.append({"role": "user", "content": text})
        body = {"messages": history, "max_tokens": answer, "temperature": 0, "ignore_eos": True, **extra}
        t = time.perf_counter()
        r = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
        dt = time.perf_counter() - t
        r.raise_for_status()
        doc = r.json()
        history.append({"role": "assistant", "content": doc["choices"][0]["message"]["content"]})
        out.append((dt, doc["usage"]["prompt_tokens"], doc["timings"]["prompt_n"], doc["timings"]["prompt_ms"] / 1000))
    return out


def stream_rate(url: str, headers: dict, body: dict) -> float:
    times = []
    with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers, stream=True,
                       timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: {") and b'"content":"' in line:
                times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "chat")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--answer", type=int, default=32, help="tokens per answer")
    ap.add_argument("--requests", type=int, default=300, help="requests for the overhead measure")
    ap.add_argument("--stream-tokens", type=int, default=400)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--parts", default="chat,overhead,stream", help="which measures to run")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    base, folder, params = make_model(args.work)
    print(machine_line(machine_facts(), args.repeat))
    print(f"base {base.name}: {params / 1e6:.0f}M parameters, F16, {base.stat().st_size / 2**20:.0f} MiB; adapter "
          f"chat (rank 16, all-linear); llama-server {' '.join(EXTRA)}; answers of {args.answer} tokens")
    with Router(base, folder, port=0, extra_args=EXTRA, log=args.work / "router.log", watch=None) as router:
        if "chat" in parts:
            chats(router, base, folder, args)
        if "overhead" in parts:
            overhead(router, args.requests)
        if "stream" in parts:
            streams(router, args.stream_tokens, args.streams)


def chats(router: Router, base: Path, folder: Path, args) -> None:
    runs: dict[str, list] = {"router": [], "no cache": []}
    with ManagedServer(base, folder, extra_args=EXTRA, log=args.work / "old.log", ready_timeout=600) as old:
        old.use("chat")
        for seed in (100 + i for i in range(args.repeat)):  # alternate, so that load from elsewhere hits both
            runs["router"].append(chat(router.url, {}, seed, args.answer, {"model": "chat"}))
            runs["no cache"].append(chat(old.url, {}, seed, args.answer, {}))
    print(f"\n{'turn':>4} {'prompt':>6} | {'no cache: ms':>12} {'prompt ms':>9} {'evaluated':>9} | "
          f"{'router: ms':>10} {'prompt ms':>9} {'evaluated':>9} | {'speed-up':>8} {'prompt':>7}")
    speedups, prompt_speedups = [], []
    for i in range(TURNS):
        med = {k: [statistics.median(r[i][j] for r in v) for j in range(4)] for k, v in runs.items()}
        old_t, new_t = med["no cache"], med["router"]
        speedups.append(old_t[0] / new_t[0])
        prompt_speedups.append(old_t[3] / new_t[3])
        print(f"{i + 1:>4} {runs['router'][0][i][1]:>6} | {old_t[0] * 1000:>12.0f} {old_t[3] * 1000:>9.0f} "
              f"{old_t[2]:>9.0f} | {new_t[0] * 1000:>10.0f} {new_t[3] * 1000:>9.0f} {new_t[2]:>9.0f} | "
              f"{speedups[-1]:>7.2f}x {prompt_speedups[-1]:>6.2f}x")
    print(f"goal: last turns >= 3x faster -> turn time {speedups[-2]:.2f}x, {speedups[-1]:.2f}x "
          f"({'met' if min(speedups[-2:]) >= 3 else 'NOT met'}); prompt processing (the wait before the first "
          f"token) {prompt_speedups[-2]:.2f}x, {prompt_speedups[-1]:.2f}x")


def overhead(router: Router, n: int) -> None:
    b = router.backend
    body = {"messages": [{"role": "user", "content": "abc def"}], "max_tokens": 1, "temperature": 0}
    direct_body = {**body, "lora": b.lora({"chat": 1.0})}
    via, straight = [], []
    with requests.Session() as s1, requests.Session() as s2:
        for i in range(n + 10):  # the first 10 warm both paths and the slot's cache
            t = time.perf_counter()
            s1.post(router.url + "/v1/chat/completions", json={**body, "model": "chat"},
                    timeout=60).raise_for_status()
            t1 = time.perf_counter()
            s2.post(b.url + "/v1/chat/completions", json=direct_body, headers=b.headers,
                    timeout=60).raise_for_status()
            if i >= 10:
                via.append((t1 - t) * 1000)
                straight.append((time.perf_counter() - t1) * 1000)
    diff = [a - c for a, c in zip(via, straight)]
    print(f"\nnon-streamed 1-token request: router p50 {pct(via, .5):.2f} ms, llama-server p50 "
          f"{pct(straight, .5):.2f} ms; router overhead p50 {pct(diff, .5):.2f} ms, p90 {pct(diff, .9):.2f} ms "
          f"(n={n}); goal <= 2 ms p50: {'met' if pct(diff, .5) <= 2 else 'NOT met'}")


def streams(router: Router, tokens: int, n: int) -> None:
    b = router.backend
    long = {"messages": [{"role": "user", "content": "abc def"}], "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True}
    ratios = []  # router / direct tokens/s, in pairs, the order alternating
    for i in range(n):
        pair = {}
        for who in (("router", "direct") if i % 2 == 0 else ("direct", "router")):
            pair[who] = stream_rate(router.url, {}, {**long, "model": "chat"}) if who == "router" else \
                stream_rate(b.url, b.headers, {**long, "lora": b.lora({"chat": 1.0})})
        ratios.append(pair["router"] / pair["direct"])
    gap = (1 - statistics.median(ratios)) * 100
    print(f"streamed {tokens} tokens, router/llama-server tokens/s in {n} pairs: median "
          f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); router {gap:+.1f}% "
          f"slower; goal within 3%: {'met' if abs(gap) <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
