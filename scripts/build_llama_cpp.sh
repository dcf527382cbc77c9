#!/usr/bin/env bash
# Build llama-server, llama-quantize and llama-export-lora from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI, at a pinned version, into a cache folder outside the repo.
# Reused when present. Prints the folder holding the binaries on its last line.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${GGUF_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-lora}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/build/bin"
PY="${PYTHON:-python3}"

if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-export-lora" ] \
   && [ -f "$ROOT/src/convert_hf_to_gguf.py" ]; then
  echo "$BIN"; exit 0
fi

mkdir -p "$ROOT"
if [ ! -f "$ROOT/src/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading llama-cpp-python==$VERSION sdist from PyPI" >&2
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" >&2
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  rm -rf "$ROOT/src"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src"
fi

echo "building llama.cpp ($VERSION) in $ROOT/build (about 5 minutes on 2 cores)" >&2
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON >&2
cmake --build "$ROOT/build" -j "$(nproc)" --target llama-server llama-quantize llama-export-lora >&2
echo "$BIN"
