"""Start-up stays cheap: `import gguf_lora` and the commands that touch no tensors (`--help`, `adapters
use/list`, `modelfile`, `serve`'s argument checks) import none of the heavy modules. Checked in a fresh
interpreter with -X importtime, by which modules were imported (not by how long it took: timings belong
to bench/bench_startup.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_lora.runtime.llama_server import free_port

ROOT = Path(__file__).resolve().parent.parent
TENSOR_MODULES = {"numpy", "gguf", "numba", "llvmlite", "torch", "safetensors", "threadpoolctl"}
LIBRARY_HEAVY = TENSOR_MODULES | {"requests", "urllib3", "rich", "typer", "click"}


def imports(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run python -X importtime ARGS; return the process and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    assert "gguf_lora" in names or "import gguf_lora" not in " ".join(args), proc.stderr[-2000:]
    return proc, names


def test_import_gguf_lora_loads_nothing_heavy():
    proc, names = imports("-c", "import gguf_lora; gguf_lora.__version__; gguf_lora.GgufLoraError")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not names & LIBRARY_HEAVY, sorted(names & LIBRARY_HEAVY)


def test_the_check_sees_heavy_imports():
    """The control: asking for a tensor function does import numpy and gguf (so the checks above can fail)."""
    proc, names = imports("-c", "import gguf_lora; gguf_lora.merge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"numpy", "gguf"} <= names


def test_lazy_exports_are_the_functions():
    """Importing the submodule gguf_lora.merge must not replace the function gguf_lora.merge."""
    import gguf_lora
    import gguf_lora.convert  # noqa: F401
    import gguf_lora.merge  # noqa: F401
    from gguf_lora.merge import merge

    assert gguf_lora.merge is merge and callable(gguf_lora.convert)
    from gguf_lora import ConvertResult, LlamaServer, Ollama, quantize  # noqa: F401

    with pytest.raises(AttributeError):
        gguf_lora.no_such_name  # noqa: B018
    assert set(gguf_lora.__all__) <= set(dir(gguf_lora))


@pytest.mark.parametrize("command", [["--help"], ["adapters", "use", "--help"], ["adapters", "list", "--help"],
                                     ["modelfile", "--help"], ["serve", "--help"], ["merge", "--help"]])
def test_help_loads_no_tensor_module(command):
    """Plain help: no tensor module, no HTTP client, and not rich (typer's rich help doubles the time)."""
    proc, names = imports("-m", "gguf_lora", *command)
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr[-2000:]
    heavy = TENSOR_MODULES | {"requests", "rich"}
    assert not names & heavy, sorted(names & heavy)


def test_adapters_use_loads_no_tensor_module():
    """One HTTP call (to a port where nothing listens): requests, but no numpy, gguf or numba."""
    proc, names = imports("-m", "gguf_lora", "adapters", "use", "sql", "--url", f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "error:" in proc.stderr, proc.stderr[-2000:]
    assert "requests" in names
    assert not names & (TENSOR_MODULES | {"rich"}), sorted(names & (TENSOR_MODULES | {"rich"}))


def test_modelfile_loads_no_tensor_module(tmp_path):
    proc, names = imports("-m", "gguf_lora", "modelfile", "--from", "llama3.2:1b", "-o", str(tmp_path / "Modelfile"),
                          "--system", "Be brief.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FROM llama3.2:1b" in (tmp_path / "Modelfile").read_text()
    assert not names & (TENSOR_MODULES | {"requests"}), sorted(names & (TENSOR_MODULES | {"requests"}))


def test_serve_refuses_a_missing_base_before_loading_tensor_modules(tmp_path):
    proc, names = imports("-m", "gguf_lora", "serve", "--base", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 1 and "error:" in proc.stderr, proc.stderr[-2000:]
    assert not names & TENSOR_MODULES, sorted(names & TENSOR_MODULES)
