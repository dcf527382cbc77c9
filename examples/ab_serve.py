#!/usr/bin/env python
"""Serve one base with several adapters and compare them on one prompt (A/B), switching per request.

    python examples/ab_serve.py --base ./base.gguf --adapters ./gguf-adapters "Write a SQL query that"

Starts llama-server on a free loopback port, asks the bare base and then every adapter the same prompt
(greedy, so the answers are reproducible), prints them side by side, and stops the server.
Pass --url to compare on a server that is already running (e.g. one `gguf-lora serve` started) instead.
"""
from __future__ import annotations

import argparse
import sys

from gguf_lora.errors import GgufLoraError
from gguf_lora.runtime.llama_server import LlamaServer, ManagedServer


def compare(client: LlamaServer, prompt: str, n_predict: int) -> list[tuple[str, str]]:
    rows = []
    for name in [None] + [a.name for a in client.adapters()]:
        answer = client.complete(prompt, adapter=name or {}, n_predict=n_predict, temperature=0.0, seed=1)
        rows.append((name or "(base)", answer["content"]))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--base", help="base GGUF (starts a server)")
    p.add_argument("--adapters", help="folder of GGUF LoRAs (starts a server)")
    p.add_argument("--url", help="use a running llama-server instead")
    p.add_argument("--n-predict", type=int, default=32)
    args = p.parse_args()
    try:
        if args.url:
            rows = compare(LlamaServer(args.url), args.prompt, args.n_predict)
        elif args.base and args.adapters:
            with ManagedServer(args.base, args.adapters, extra_args=["-c", "2048"]) as client:
                rows = compare(client, args.prompt, args.n_predict)
        else:
            p.error("pass --base and --adapters, or --url")
    except GgufLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}} | {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
