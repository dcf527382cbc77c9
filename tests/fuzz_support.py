"""Shared machinery of the fuzz suite: Hypothesis settings, the CLI property, llama.cpp as the judge of what
we write, and a tally of every generated case and its outcome (printed at the end of the run).

CI runs a bounded, seeded number of examples per property (derandomized: the same cases every run). A
longer run: GGUF_LORA_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_*.py (GGUF_LORA_FUZZ_SEED=N for other
cases than the CI ones).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings
from typer.testing import CliRunner

from gguf_lora.cli import app
from gguf_lora.llama_cpp import find_tool

EXAMPLES = int(os.environ.get("GGUF_LORA_FUZZ_EXAMPLES", "0") or 0)
SEED = os.environ.get("GGUF_LORA_FUZZ_SEED")
LLAMA_CPP_SAMPLE = int(os.environ.get("GGUF_LORA_FUZZ_LLAMA_CPP_SAMPLE", "4"))  # successes checked per property

# property -> outcome -> count, and the distinct refusals seen (message with paths and numbers blanked out)
TALLY: dict[str, Counter] = defaultdict(Counter)
REFUSALS: dict[str, Counter] = defaultdict(Counter)
runner = CliRunner()


def fuzz(default: int, **extra) -> settings:
    """Settings for one property: `default` examples in CI, GGUF_LORA_FUZZ_EXAMPLES for a long run."""
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None, derandomize=SEED is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
                    print_blob=True, **extra)


def seed_decorator():
    from hypothesis import seed

    return seed(int(SEED)) if SEED is not None else (lambda f: f)


def record(prop: str, outcome: str, message: str = "") -> None:
    TALLY[prop][outcome] += 1
    if message:
        shape = re.sub(r"(/[^\s,;:'\"]+)+", "PATH", message)
        shape = re.sub(r"-?\d[\d.e+]*", "N", shape)
        shape = re.sub(r"'[^']*'", "'X'", shape)
        REFUSALS[prop][shape[:110]] += 1


def digest(paths) -> dict[str, str]:
    """sha256 of every file under the given files and folders: inputs must come out unchanged."""
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(prop: str, args: list, *, inputs=(), out_dir: Path | None = None, wall: float = 30.0) -> str | None:
    """Run the command in-process and check the property: exit 0, or exit 1 with exactly one line 'error: ...'
    and no exception (no traceback); inputs unchanged; on failure nothing left in out_dir (no output, no
    temporary file); wall time bounded. Returns the error line, or None on success."""
    before = digest(inputs)
    t0 = time.monotonic()
    result = runner.invoke(app, [str(a) for a in args])
    elapsed = time.monotonic() - t0
    assert elapsed < wall, f"{args[0]} took {elapsed:.1f} s (bound {wall} s)"
    assert digest(inputs) == before, "an input file was modified"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("uncaught exception (a traceback for the user):\n" + "".join(
            traceback.format_exception(result.exception)))
    if result.exit_code == 0:
        record(prop, "ok")
        return None
    lines = [ln for ln in result.output.split("\n") if ln.strip()]  # str.splitlines also splits on \x1c..\x1e
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    if out_dir is not None:
        assert list(Path(out_dir).iterdir()) == [], f"left behind: {list(Path(out_dir).iterdir())}"
    record(prop, "refused", lines[0][len("error: "):])
    return lines[0]


_checked: Counter = Counter()


def llama_cpp_sample(prop: str) -> bool:
    """True for the first LLAMA_CPP_SAMPLE successes of a property: those are also loaded by llama.cpp."""
    _checked[prop] += 1
    return _checked[prop] <= LLAMA_CPP_SAMPLE


def llama_cpp_loads_model(path: Path, tmp: Path) -> tuple[bool, str]:
    """llama.cpp's model loader with tensor validation (llama-quantize COPY: check_tensors, NaN/Inf rows)."""
    proc = subprocess.run([str(find_tool("llama-quantize")), str(path), str(tmp / "copy.gguf"), "COPY"],
                          capture_output=True, text=True, errors="replace", timeout=120)
    (tmp / "copy.gguf").unlink(missing_ok=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-1500:]


def llama_cpp_loads_adapter(base: Path, adapter: Path, tmp: Path) -> tuple[bool, str]:
    """llama.cpp's adapter loading and pair checks against the base (llama-export-lora)."""
    proc = subprocess.run([str(find_tool("llama-export-lora")), "-m", str(base), "--lora", str(adapter), "-o",
                           str(tmp / "merged.gguf"), "-t", "1"], capture_output=True, text=True, errors="replace",
                          timeout=120)
    (tmp / "merged.gguf").unlink(missing_ok=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-1500:]


def summary() -> list[str]:
    if not TALLY:
        return []
    total = sum(sum(c.values()) for c in TALLY.values())
    lines = [f"fuzz: {total} generated cases ({'GGUF_LORA_FUZZ_EXAMPLES=' + str(EXAMPLES) if EXAMPLES else 'CI'}"
             f"{', seed ' + SEED if SEED else ', derandomized'})"]
    for prop in sorted(TALLY):
        c = TALLY[prop]
        lines.append(f"  {prop}: {sum(c.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for shape, n in REFUSALS[prop].most_common(6):
            lines.append(f"      {n:5d} x {shape}")
    return lines
