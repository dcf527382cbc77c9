#!/usr/bin/env python
"""Convert every PEFT adapter in a folder into GGUF LoRAs for one base, ready for `gguf-lora serve`.

    python examples/batch_convert.py ./adapters --base ./Llama-3.2-1B-Instruct-Q8_0.gguf --out ./gguf-adapters
    gguf-lora serve --base ./Llama-3.2-1B-Instruct-Q8_0.gguf --adapters ./gguf-adapters

Each subfolder holding an adapter_config.json becomes OUT/<subfolder>.gguf (its name on the server).
Adapters already converted from the same files are skipped; one that cannot be converted is reported and
the others still run. Exit code 1 when any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gguf_lora import convert
from gguf_lora.errors import GgufLoraError
from gguf_lora.peft import sha256_file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", type=Path, help="folder whose subfolders are PEFT adapters")
    p.add_argument("--base", type=Path, required=True, help="the base GGUF the adapters will run on")
    p.add_argument("--out", type=Path, required=True, help="folder for the GGUF LoRAs")
    p.add_argument("--outtype", default="f16", help="f16 (default), f32, bf16 or q8_0")
    args = p.parse_args()

    folders = sorted(d for d in args.adapters.iterdir() if (d / "adapter_config.json").is_file()) \
        if args.adapters.is_dir() else []
    if not folders:
        print(f"error: no PEFT adapter (a subfolder with adapter_config.json) in {args.adapters}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for folder in folders:
        out = args.out / f"{folder.name}.gguf"
        stamp = args.out / f".{folder.name}.source.json"
        source = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()}
        source["base"], source["outtype"] = str(args.base.resolve()), args.outtype
        if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
            print(f"unchanged  {folder.name}")
            continue
        try:
            result = convert(folder, args.base, out, args.outtype, force=True)
        except GgufLoraError as e:
            failed += 1
            print(f"FAILED     {folder.name}: {e}")
            continue
        stamp.write_text(json.dumps(source))
        print(f"converted  {folder.name} -> {out} (rank {', '.join(map(str, result.ranks))}, "
              f"{result.bytes:,} bytes)")
    print(f"{len(folders) - failed} of {len(folders)} adapters ready in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
