"""Finding llama.cpp's tools: by explicit path, environment variable, the pinned build's cache, or PATH.

The pinned build comes from the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI
(scripts/build_llama_cpp.sh, `just llama-cpp`); it is cached outside the repo, keyed by version.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from .errors import InputError

PINNED = "0.3.36"  # llama-cpp-python version; carries llama.cpp of 2026-10-01
BUILD_HINT = ("build the pinned llama.cpp with 'just llama-cpp' (scripts/build_llama_cpp.sh: a 77 MB download, then "
              "about 7 minutes of compiling on 2 idle cores, several times that on a busy machine)")


def cache_root() -> Path:
    if os.environ.get("GGUF_LORA_CACHE"):
        return Path(os.environ["GGUF_LORA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gguf-lora"


def pinned_root() -> Path:
    return cache_root() / f"llama.cpp-{PINNED}"


def find_tool(name: str, explicit: str | Path | None = None) -> Path:
    """Locate a llama.cpp binary (llama-server, llama-quantize, llama-export-lora)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("GGUF_LORA_LLAMA_CPP_BIN"):
        candidates.append(Path(os.environ["GGUF_LORA_LLAMA_CPP_BIN"]) / name)
    candidates.append(pinned_root() / "build" / "bin" / name)
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    if explicit:
        raise InputError(f"{explicit} is not an executable {name}", "", "pass the path of the binary")
    raise InputError(f"{name} was not found", "looked in $GGUF_LORA_LLAMA_CPP_BIN, "
                     f"{pinned_root() / 'build' / 'bin'} and PATH", BUILD_HINT)


def find_source_file(relative: str) -> Path:
    """A file of the pinned llama.cpp tree, e.g. convert_hf_to_gguf.py."""
    path = pinned_root() / "src" / relative
    if not path.is_file():
        raise InputError(f"{path} was not found", "the pinned llama.cpp source is not in the cache", BUILD_HINT)
    return path


def convert_hf_hint() -> str:
    """How a Hugging Face model becomes a GGUF: llama.cpp's own converter, at its real path."""
    script = pinned_root() / "src" / "convert_hf_to_gguf.py"
    fetched = "" if script.is_file() else " ('just llama-cpp' fetches it)"
    return (f"convert it with llama.cpp's converter, which needs torch{fetched}: python {script} HF_MODEL_FOLDER "
            "--outfile base.gguf --outtype f16")


def where() -> str:
    """Where the tools a user runs by hand are: this CLI, the pinned llama.cpp binaries and its converter."""
    cli = Path(sys.executable).parent / "gguf-lora"
    bin_dir = pinned_root() / "build" / "bin"
    built = "" if (bin_dir / "llama-server").is_file() else "   (not built yet: just llama-cpp)"
    src = pinned_root() / "src" / "convert_hf_to_gguf.py"
    if not src.is_file():
        fetched = "   (not fetched yet: just llama-cpp)"
    else:
        fetched = "" if importlib.util.find_spec("torch") else "   (needs torch: just setup-test)"
    return "\n".join([
        f"gguf-lora              {cli}   (or: just run ARGS, or source {cli.parent}/activate)",
        f"llama-server           {bin_dir / 'llama-server'}{built}",
        f"llama-quantize         {bin_dir / 'llama-quantize'}",
        f"llama-export-lora      {bin_dir / 'llama-export-lora'}",
        f"convert_hf_to_gguf.py  {src}{fetched}",
    ])
