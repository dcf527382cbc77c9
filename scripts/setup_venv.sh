#!/usr/bin/env bash
# The project's virtual environment for `just`: .venv with gguf-lora (editable) and its dependencies, and
# with `test` also the test references (torch, transformers, peft, pytest).
# Installs once; again only when pyproject.toml changes (a stamp in .venv holds its sha256). One line per step.
#
# torch: an installed torch is kept, whatever its build. Otherwise it comes from $TORCH_INDEX_URL when set
# (https://download.pytorch.org/whl/cpu is the CPU-only build), else from PyPI, which on Linux x86-64 is the
# CUDA build (several GB).
#
# usage: scripts/setup_venv.sh [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
LEVEL=${1:-runtime}
VENV=${GGUF_LORA_VENV:-.venv}
PY="$VENV/bin/python"
TORCH_VERSION=2.13.0  # the version the tests are pinned against (transformers 5.24, peft 0.21.2)
say() { echo "setup: $*" >&2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1  # one line per step: no "a new release of pip" notices

case "$LEVEL" in runtime|test) ;; *) say "unknown level '$LEVEL' (runtime or test)"; exit 2 ;; esac

if [ ! -x "$PY" ]; then
  say "creating $VENV with $(command -v python3)"
  python3 -m venv "$VENV" || {
    say "python3 -m venv failed; on Debian/Ubuntu: sudo apt install python3-venv"; exit 1; }
fi
KEY="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(),
                                          *sys.version_info[:2])')"
stamp() { [ "$(cat "$VENV/.gguf-lora-$1" 2>/dev/null)" = "$KEY" ]; }

if [ "$LEVEL" = test ]; then
  stamp test && exit 0
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      say "installing torch $TORCH_VERSION from $TORCH_INDEX_URL"
      "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
      say "installing torch $TORCH_VERSION from PyPI: on Linux x86-64 the CUDA build, several GB" \
          "(CPU-only: stop, then TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu just test)"
      "$PY" -m pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  say "installing gguf-lora and the test references (transformers, peft, pytest) into $VENV"
  "$PY" -m pip install -q -e '.[test]'
  echo "$KEY" >"$VENV/.gguf-lora-test"
  echo "$KEY" >"$VENV/.gguf-lora-runtime"
else
  stamp runtime && exit 0
  say "installing gguf-lora and its dependencies (numpy, gguf, numba, typer, ...) into $VENV; no torch"
  "$PY" -m pip install -q -e .
  echo "$KEY" >"$VENV/.gguf-lora-runtime"
fi
say "done: the CLI is $VENV/bin/gguf-lora ('just run ARGS', or 'source $VENV/bin/activate')"
