#!/usr/bin/env bash
# Build llama-server, llama-quantize and llama-export-lora from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI, at a pinned version, into a cache folder outside the repo.
# Reused when present and built for this CPU with these flags (GGML_NATIVE: the build is stamped with the
# CPU's feature flags and the compiler flags, and rebuilt when either differs). A rebuild happens in a
# staging folder that replaces the cached one only when complete. One line per stage on stderr; cmake's
# output goes to a log.
# Prints the folder holding the binaries on its last line (stdout).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${GGUF_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-lora}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/build/bin"
LOG="$ROOT/build.log"
PY="${PYTHON:-python3}"
# AMX off on x86: virtual machines advertise AMX without enabling its tile state, and the AMX kernels of a
# -march=native build then die with SIGILL on quantized weights (seen on this project's CI machine).
# GCC keeps explicitly disabled extensions off whatever -march=native says.
CFLAGS_EXTRA=""
case "$(uname -m)" in x86_64|i?86) CFLAGS_EXTRA="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;; esac
# what the build is for: the CPU model and its instruction-set flags, and our compiler flags
CPU_KEY=$( (uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || true; echo "$CFLAGS_EXTRA") \
  | cksum | cut -d' ' -f1)

say() { echo "llama.cpp $VERSION: $*" >&2; }

if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-export-lora" ] \
   && [ -f "$ROOT/src/convert_hf_to_gguf.py" ] && [ "$(cat "$ROOT/build/cpu-key" 2>/dev/null)" = "$CPU_KEY" ]; then
  echo "$BIN"; exit 0
fi

mkdir -p "$ROOT"
if [ ! -f "$ROOT/src/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  say "[1/3] downloading the llama-cpp-python==$VERSION sdist from PyPI (the pinned llama.cpp tree)"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" \
    >"$LOG" 2>&1 || { tail -20 "$LOG" >&2; say "download failed; full log: $LOG"; exit 1; }
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  rm -rf "$ROOT/src"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src"
else
  say "[1/3] source already in $ROOT/src"
  : >"$LOG"
fi

if [ -d "$ROOT/build" ]; then
  say "the cached build was made for another CPU or with other flags: rebuilding"
fi
STAGE="$ROOT/build.staging"
rm -rf "$STAGE"

say "[2/3] configuring with cmake (log: $LOG)"
cmake -S "$ROOT/src" -B "$STAGE" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_FLAGS="$CFLAGS_EXTRA" -DCMAKE_CXX_FLAGS="$CFLAGS_EXTRA" \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >>"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; say "cmake configure failed; full log: $LOG"; exit 1; }

say "[3/3] compiling llama-server, llama-quantize, llama-export-lora on $(nproc) cores (5-30 minutes on 2 cores)"
start=$(date +%s)
last=""
# one progress line per 10% of cmake's own percentage, the rest into the log
progress() {
  while IFS= read -r line; do
      if [[ "$line" =~ ^\[\ *([0-9]+)%\] ]]; then
        tens=$(( BASH_REMATCH[1] / 10 ))
        if [ "$tens" != "$last" ]; then last=$tens; say "      ${BASH_REMATCH[1]}% after $(( $(date +%s) - start )) s"; fi
      fi
    done
}
if ! cmake --build "$STAGE" -j "$(nproc)" --target llama-server llama-quantize llama-export-lora 2>&1 \
     | tee -a "$LOG" | progress || [ ! -x "$STAGE/bin/llama-server" ]; then
  grep -iE -m20 "error" "$LOG" >&2 || tail -30 "$LOG" >&2
  say "compilation failed; full log: $LOG"; exit 1
fi
echo "$CPU_KEY" >"$STAGE/cpu-key"
# the binaries are static: the folder can move; running servers keep their (unlinked) files
rm -rf "$ROOT/build.old"
[ -d "$ROOT/build" ] && mv "$ROOT/build" "$ROOT/build.old"
mv "$STAGE" "$ROOT/build"
rm -rf "$ROOT/build.old"
say "built in $(( $(date +%s) - start )) s: $BIN"
echo "$BIN"
