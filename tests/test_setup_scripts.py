"""The set-up scripts behind `just`: what they would build or install, and when they do nothing.

scripts/build_llama_cpp.sh is run with a fake CPU (GGUF_LORA_CPU_ARCH / _FLAGS) and GGUF_LORA_BUILD_DRY_RUN, so
nothing is compiled; scripts/setup_venv.sh runs against a fake venv whose python records pip calls instead of
installing. The real runs are `just test` itself and the README check on a fresh clone.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
V3 = "fpu sse2 sse4_2 avx avx2 fma f16c bmi1 bmi2"
AMX = V3 + " avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8"


def build(cache: Path, arch: str = "x86_64", flags: str = V3) -> subprocess.CompletedProcess:
    env = {**os.environ, "GGUF_LORA_CACHE": str(cache), "GGUF_LORA_CPU_ARCH": arch, "GGUF_LORA_CPU_FLAGS": flags,
           "GGUF_LORA_BUILD_DRY_RUN": "1"}
    return subprocess.run(["bash", str(SCRIPTS / "build_llama_cpp.sh")], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("arch, flags, want", [
    ("x86_64", AMX, "would build for x86_64 x86-64-v3:"),  # never -march=native: AMX traps in some VMs
    ("x86_64", V3, "would build for x86_64 x86-64-v3:"),
    ("x86_64", "fpu sse2 sse4_2 avx", "would build for x86_64 x86-64: -DGGML_SSE42=OFF -DGGML_AVX=OFF "
                                      "-DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF"),
    ("aarch64", "fp asimd sve", "would build for aarch64 generic:"),
])
def test_build_target_comes_from_the_cpu(tmp_path, arch, flags, want):
    done = build(tmp_path, arch, flags)
    assert done.returncode == 0 and done.stdout.strip() == want, done.stderr
    assert not any(tmp_path.iterdir())  # a dry run touches nothing


def fake_build(cache: Path, target: str) -> Path:
    root = cache / "llama.cpp-0.3.36"
    (root / "build" / "bin").mkdir(parents=True)
    for tool in ("llama-server", "llama-quantize", "llama-export-lora"):
        (root / "build" / "bin" / tool).write_text("#!/bin/sh\n")
        (root / "build" / "bin" / tool).chmod(0o755)
    (root / "src").mkdir()
    (root / "src" / "convert_hf_to_gguf.py").write_text("")
    (root / "build" / "target").write_text(target + "\n")
    return root / "build" / "bin"


def test_a_build_is_reused_on_any_cpu_that_runs_it(tmp_path):
    bin_dir = fake_build(tmp_path, "x86_64 x86-64-v3")
    for flags in (V3, AMX):
        done = build(tmp_path, flags=flags)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{bin_dir}\n", "")


@pytest.mark.parametrize("target, flags", [
    ("536765601", V3),  # a -march=native build stamped by an earlier script: its CPU is unknown
    ("x86_64 x86-64-v3", "fpu sse2"),  # built for AVX2, this CPU has none
])
def test_a_build_for_another_target_is_redone(tmp_path, target, flags):
    fake_build(tmp_path, target)
    done = build(tmp_path, flags=flags)
    assert done.returncode == 0 and done.stdout.startswith("would build for x86_64 "), done.stdout + done.stderr


def test_an_interrupted_build_is_resumed_not_redone(tmp_path):
    fake_build(tmp_path, "x86_64 x86-64-v3")
    build_dir = tmp_path / "llama.cpp-0.3.36" / "build"
    (build_dir / "target").unlink()  # stamped only once it is finished
    (build_dir / "configured-for").write_text("x86_64 x86-64-v3\n")
    assert build(tmp_path).stdout == "would resume: would build for x86_64 x86-64-v3:\n"
    assert build(tmp_path, flags="fpu sse2").stdout.startswith("would build for x86_64 x86-64: ")


@pytest.fixture
def repo(tmp_path):
    """A copy of the set-up script in a fake checkout whose .venv/bin/python logs pip instead of running it."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "setup_venv.sh", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "pip $*" >>"{tmp_path}/pip.log"; exit 0; fi
case "$*" in *"import torch"*) [ -n "$NO_TORCH" ] && exit 1 ;; esac
exec {sys.executable} "$@"
""")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def setup(repo: Path, level: str, **env) -> tuple[list[str], str]:
    """(pip calls made by this run, stderr)"""
    log = repo / "pip.log"
    before = log.read_text().splitlines() if log.exists() else []
    done = subprocess.run(["bash", str(repo / "scripts" / "setup_venv.sh"), level], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    after = log.read_text().splitlines() if log.exists() else []
    return after[len(before):], done.stderr


def test_setup_installs_once_and_again_when_pyproject_changes(repo):
    calls, said = setup(repo, "runtime")
    assert calls == ["pip install -q -e ."]
    assert said.splitlines()[0].startswith("setup: installing gguf-lora and its dependencies")
    assert setup(repo, "runtime") == ([], "")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert setup(repo, "runtime")[0] == ["pip install -q -e ."]


def test_setup_for_tests_takes_torch_from_the_index_asked_for(repo):
    calls, said = setup(repo, "test", NO_TORCH="1", TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu")
    assert calls == ["pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
                     "pip install -q -e .[test]"]
    assert "setup: installing torch 2.13.0 from https://download.pytorch.org/whl/cpu" in said
    assert setup(repo, "test", NO_TORCH="1")[0] == []
    assert setup(repo, "runtime")[0] == []  # the test set-up includes the runtime one


def test_setup_keeps_an_installed_torch_and_warns_before_the_cuda_one(repo):
    assert setup(repo, "test")[0] == ["pip install -q -e .[test]"]  # this python has torch
    (repo / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    calls, said = setup(repo, "test", NO_TORCH="1", TORCH_INDEX_URL="")
    assert calls == ["pip install -q torch==2.13.0", "pip install -q -e .[test]"]
    assert "the CUDA build, several GB" in said and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in said
