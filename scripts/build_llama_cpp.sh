#!/usr/bin/env bash
# Build llama-server, llama-quantize and llama-export-lora from the llama.cpp tree vendored in the
# llama-cpp-python sdist on PyPI, at a pinned version, into a cache folder outside the repo.
#
# Portable, not -march=native: a native build compiles in every instruction set the CPU reports, and a
# virtual machine may report some that trap (AMX: llama-server died with SIGILL on Q8_0 and K-quant
# models), and it cannot be reused on another CPU. x86-64 builds target x86-64-v3 (AVX2, FMA, F16C, BMI2)
# where the CPU has it, else plain x86-64; other architectures get ggml's generic build. The build is
# stamped with that target and reused wherever it runs; a build for a target this CPU lacks is redone.
#
# One line per stage on stderr; cmake's output goes to a log. Prints the binaries' folder last (stdout).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${GGUF_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-lora}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/build/bin"
LOG="$ROOT/build.log"
PY="${PYTHON:-python3}"
JOBS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)

say() { echo "llama.cpp $VERSION: $*" >&2; }

# The build target, from the CPU's feature flags (GGUF_LORA_CPU_ARCH / _FLAGS override them, for tests).
ARCH=${GGUF_LORA_CPU_ARCH:-$(uname -m)}
FLAGS=" ${GGUF_LORA_CPU_FLAGS-$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2)} "
has() { for f in "$@"; do [[ "$FLAGS" == *" $f "* ]] || return 1; done; }
case "$ARCH" in
  x86_64|amd64)
    if has avx avx2 fma f16c bmi2; then
      TARGET=x86-64-v3; CPU_OPTS=()  # ggml's defaults without GGML_NATIVE: SSE4.2, AVX, AVX2, FMA, F16C, BMI2
    else
      TARGET=x86-64; CPU_OPTS=(-DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF
                               -DGGML_BMI2=OFF)
    fi ;;
  *) TARGET=generic; CPU_OPTS=() ;;
esac
KEY="$ARCH $TARGET"

built() {
  [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-export-lora" ] \
    && [ -f "$ROOT/src/convert_hf_to_gguf.py" ] && [ "$(cat "$ROOT/build/target" 2>/dev/null)" = "$KEY" ]
}
if built; then echo "$BIN"; exit 0; fi
# GGUF_LORA_BUILD_DRY_RUN=1: say what would be built, touch nothing (tests/test_build_script.py)
if [ -n "${GGUF_LORA_BUILD_DRY_RUN:-}" ]; then
  [ "$(cat "$ROOT/build/configured-for" 2>/dev/null)" = "$KEY" ] && echo -n "would resume: "
  echo "would build for $KEY:${CPU_OPTS[*]+ ${CPU_OPTS[*]}}"; exit 0
fi

mkdir -p "$ROOT"
# Two builds at once (two terminals, two test runs) would write over each other: the second one waits.
if command -v flock >/dev/null; then
  exec 9>"$ROOT.lock"
  if ! flock -n 9; then say "waiting for another build of it to finish"; flock 9; fi
  if built; then echo "$BIN"; exit 0; fi
fi
: >"$LOG"

if [ ! -f "$ROOT/src/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # only this package as source: its build tools (scikit-build-core) come as wheels, not built from source too
  say "[1/3] downloading the llama-cpp-python==$VERSION sdist from PyPI (the pinned llama.cpp tree, 77 MB)"
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$VERSION" \
    >>"$LOG" 2>&1 || { tail -20 "$LOG" >&2; say "download failed; full log: $LOG"; exit 1; }
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  rm -rf "$ROOT/src"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$ROOT/src"
else
  say "[1/3] source already in $ROOT/src"
fi

if [ -d "$ROOT/build" ] && [ "$(cat "$ROOT/build/configured-for" 2>/dev/null)" = "$KEY" ]; then
  say "resuming an unfinished build"  # interrupted: make picks up where it stopped
elif [ -d "$ROOT/build" ]; then
  say "the cached build is for '$(cat "$ROOT/build/target" 2>/dev/null || echo 'an unknown CPU')', this CPU needs '$KEY': rebuilding"
  rm -rf "$ROOT/build"
fi
mkdir -p "$ROOT/build"
echo "$KEY" >"$ROOT/build/configured-for"

say "[2/3] configuring with cmake for $TARGET (log: $LOG)"
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=OFF ${CPU_OPTS[@]+"${CPU_OPTS[@]}"} \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >>"$LOG" 2>&1 \
  || { tail -30 "$LOG" >&2; say "cmake configure failed; full log: $LOG"; exit 1; }

say "[3/3] compiling llama-server, llama-quantize, llama-export-lora with $JOBS jobs" \
    "(about 7 minutes on 2 idle cores, several times that on a busy machine)"
start=$(date +%s)
# one progress line per 10% of cmake's own percentage; everything goes to the log
progress() {
  local last="" line tens
  while IFS= read -r line; do
    if [[ "$line" =~ ^\[\ *([0-9]+)%\] ]]; then
      tens=$(( BASH_REMATCH[1] / 10 ))
      if [ "$tens" != "$last" ]; then last=$tens; say "      ${BASH_REMATCH[1]}% after $(( $(date +%s) - start )) s"; fi
    fi
  done
}
if ! cmake --build "$ROOT/build" -j "$JOBS" --target llama-server llama-quantize llama-export-lora 2>&1 \
     | tee -a "$LOG" | progress || [ ! -x "$BIN/llama-server" ]; then
  grep -E -m20 "error|Error" "$LOG" >&2 || tail -30 "$LOG" >&2
  say "compilation failed; full log: $LOG"; exit 1
fi
echo "$KEY" >"$ROOT/build/target"
say "built in $(( $(date +%s) - start )) s"
say "llama-server, llama-quantize, llama-export-lora: $BIN"
say "convert_hf_to_gguf.py (needs torch): $ROOT/src/convert_hf_to_gguf.py"
echo "$BIN"
