#!/usr/bin/env python
"""Deploy a PEFT LoRA adapter to a homelab Ollama and prove that Ollama applies it.

    python examples/deploy_ollama.py ./my-adapter --base llama3.2:1b --name llama3.2-sql
    python examples/deploy_ollama.py ./my-adapter --base ./base.gguf --name sql --url http://nas:11434

The base is an Ollama model name (its GGUF is read from the local store, $OLLAMA_MODELS or ~/.ollama/models)
or a base .gguf. Depending on the Ollama version the adapter is attached as an ADAPTER layer or merged into
the weights; either way the new model is compared with its base on a few greedy prompts.
"""
from __future__ import annotations

import argparse
import sys

from gguf_lora.errors import GgufLoraError
from gguf_lora.runtime.ollama import Ollama, deploy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter", help="PEFT adapter folder or GGUF LoRA file")
    p.add_argument("--base", required=True, help="Ollama model name or base .gguf path")
    p.add_argument("--name", required=True, help="name of the new Ollama model")
    p.add_argument("--url", default=None, help="Ollama URL (default: $OLLAMA_HOST or http://127.0.0.1:11434)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (not 1: merged into the weights)")
    p.add_argument("--prompt", action="append", help="prompt for the check (repeatable)")
    p.add_argument("--store", default=None, help="Ollama's models folder, if not the default")
    args = p.parse_args()

    client = Ollama(args.url)
    try:
        result = deploy(args.adapter, args.base, args.name, client=client, scale=args.scale, prompts=args.prompt,
                        store=args.store, progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    except GgufLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{result.name}: {result.path} path on Ollama {result.version} ({result.reason})")
    for c in result.check:
        mark = "differs" if c["differs"] else "same   "
        print(f"  {mark}  {c['prompt']!r}: base {c['base']!r} -> adapted {c['adapted']!r}")
    print(f"check passed: {result.differs} of {len(result.check)} prompts changed; try it: ollama run {result.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
