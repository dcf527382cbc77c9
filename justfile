# gguf-lora tasks. Every recipe does its own set-up: a .venv in this folder (re-installed only when
# pyproject.toml changes) and, where needed, the pinned llama.cpp build (cached in ~/.cache/gguf-lora).
set positional-arguments := true

venv := ".venv"
py := venv / "bin/python"

# List the recipes.
default:
    @{{just_executable()}} --list --unsorted

# The bundled tiny model all the way: PEFT adapters -> GGUF LoRAs -> merged + quantized model (no torch, no build).
demo: setup
    @bash scripts/demo.sh

# Serve the tiny base with both adapters, switch between them and ask each the same thing (builds llama.cpp once).
demo-serve: setup llama-cpp
    @{{py}} scripts/demo_serve.py

# Run the gguf-lora CLI from .venv, e.g. `just run convert ./my-adapter --base ./base.gguf`.
run *args: setup
    @{{venv}}/bin/gguf-lora "$@"

# Where the CLI, the pinned llama.cpp binaries and its convert_hf_to_gguf.py are.
where: setup
    @{{py}} -c 'from gguf_lora.llama_cpp import where; print(where())'

# The whole suite, parity tests against transformers + peft and the pinned llama.cpp included.
test *args: setup-test llama-cpp
    {{py}} -m pytest "$@"

# Time gguf-lora against llama.cpp's own tools on synthetic ~1B and 8B-shaped models (not a test).
bench: setup-test llama-cpp
    {{py}} bench/bench_convert.py
    {{py}} bench/bench_speed.py
    {{py}} bench/bench_switch.py
    {{py}} bench/bench_chat.py

# .venv with gguf-lora and its dependencies (no torch).
setup:
    @bash scripts/setup_venv.sh runtime

# .venv plus the test references: torch (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build), transformers, peft, pytest.
setup-test:
    @bash scripts/setup_venv.sh test

# Build (or reuse from the cache) llama-server, llama-quantize and llama-export-lora at the pinned version.
llama-cpp: setup
    @PYTHON={{py}} bash scripts/build_llama_cpp.sh >/dev/null
