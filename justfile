# gguf-lora tasks. `just demo` and `just test` do all set-up on a fresh machine.
venv := ".venv"
py := venv / "bin/python"

# Create the virtual environment: the pinned CPU torch first (an unpinned one pulls CUDA), then the project.
setup:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q torch==2.13.0
    {{py}} -m pip install -q -e '.[test]'

# Build (or reuse from the cache) llama-server, llama-quantize and llama-export-lora at the pinned version.
llama-cpp:
    PYTHON={{py}} bash scripts/build_llama_cpp.sh

# Make a tiny example model + PEFT adapter, convert the adapter and show the result.
demo: setup
    {{py}} examples/make_example.py examples/tiny
    {{venv}}/bin/gguf-lora convert examples/tiny/adapter --base examples/tiny/base -o examples/tiny/adapter.gguf --force
    {{venv}}/bin/gguf-lora inspect examples/tiny/adapter.gguf --base examples/tiny/base

# The whole suite, parity tests against the pinned llama.cpp included.
test *args: setup llama-cpp
    {{py}} -m pytest {{args}}

# Time gguf-lora against llama.cpp's own tools on synthetic ~1B and 8B-shaped models (not a test).
bench: setup llama-cpp
    {{py}} bench/bench_convert.py
    {{py}} bench/bench_speed.py
    {{py}} bench/bench_switch.py
    {{py}} bench/bench_chat.py
