#!/usr/bin/env bash
# `just demo`: the whole story on the bundled tiny model (examples/tiny) with nothing but gguf-lora's own
# dependencies: no torch, no llama.cpp build. Every gguf-lora command is printed before it runs.
# GGUF_LORA_CLI (default .venv/bin/gguf-lora) and DEMO_OUT (default examples/tiny/out) are for tests.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a GL <<<"${GGUF_LORA_CLI:-.venv/bin/gguf-lora}"
PY=${PYTHON:-.venv/bin/python}
TINY=examples/tiny
OUT=${DEMO_OUT:-$TINY/out}
mkdir -p "$OUT/adapters"

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B="" N=""; fi
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
run() { printf '$ gguf-lora %s\n' "$*"; "${GL[@]}" "$@"; }
ROOT=$("$PY" -c 'from gguf_lora.llama_cpp import pinned_root; print(pinned_root())')
CONVERT_HF=$ROOT/src/convert_hf_to_gguf.py

step "1/5  The base model: a Hugging Face folder, made GGUF by llama.cpp's own converter"
echo "$TINY/base-hf is a random 123K-parameter llama (a Hugging Face folder). llama.cpp's convert_hf_to_gguf.py"
echo "wrote $TINY/base.gguf from it. That converter imports torch, so the demo ships its output; by hand:"
echo "  python $CONVERT_HF $TINY/base-hf --outfile $TINY/base.gguf --outtype f16"
if [ -f "$CONVERT_HF" ] && "$PY" -c 'import torch' 2>/dev/null; then
  echo "torch and the converter are here, so it runs now:"
  "$PY" "$CONVERT_HF" "$TINY/base-hf" --outfile "$OUT/base.gguf" --outtype f16 >"$OUT/convert_hf.log" 2>&1 \
    || { tail -5 "$OUT/convert_hf.log"; exit 1; }
  cmp "$TINY/base.gguf" "$OUT/base.gguf" && echo "  $OUT/base.gguf: the same bytes as $TINY/base.gguf"
else
  echo "(here it does not run: it needs torch ('just setup-test') and the pinned llama.cpp source ('just llama-cpp'))"
fi

step "2/5  Two PEFT adapters, as training writes them (adapter_config.json + adapter_model.safetensors)"
echo "sql makes the model spell 'query', poem 'rhyme'. sql is rsLoRA with an alpha_pattern: per-module scales."
run inspect "$TINY/adapters/sql"

step "3/5  convert: PEFT folder -> GGUF LoRA for llama.cpp, llama-server and Ollama (checked against the base)"
run convert "$TINY/adapters/sql" --base "$TINY/base.gguf" -o "$OUT/adapters/sql.gguf" --force
run convert "$TINY/adapters/poem" --base "$TINY/base.gguf" -o "$OUT/adapters/poem.gguf" --force
run inspect "$OUT/adapters/sql.gguf" --base "$TINY/base.gguf"

step "4/5  merge: bake an adapter into the base and quantize it, in one streaming pass"
run merge --base "$TINY/base.gguf" "$TINY/adapters/sql" -o "$OUT/base+sql-q4_k_m.gguf" --outtype q4_k_m --force

step "5/5  quantize: the same without an adapter, byte for byte what llama-quantize writes"
run quantize "$TINY/base.gguf" "$OUT/base-q8_0.gguf" q8_0 --force

step "Next"
cat <<EOF
Everything above is in $OUT. The CLI is .venv/bin/gguf-lora: run it as 'just run --help', or
'source .venv/bin/activate' and then 'gguf-lora --help'. 'just where' shows where each tool is.

just demo-serve     builds the pinned llama.cpp once (a 77 MB download, then about 7 minutes of compiling),
                    serves base.gguf with both adapters and switches between them. By hand, afterwards:
  $ROOT/build/bin/llama-server -m $TINY/base.gguf --lora $OUT/adapters/sql.gguf
  $ROOT/build/bin/llama-server -m $OUT/base+sql-q4_k_m.gguf
  gguf-lora serve --base $TINY/base.gguf --adapters $OUT/adapters   # both, switched by name
EOF
