"""The progress of a long merge / quantize / convert: the library reports bytes of output written; the CLI
shows them as a rich bar with throughput and time left on a terminal, and nothing otherwise."""
from __future__ import annotations

import io
import time

from rich.console import Console
from typer.testing import CliRunner

from gguf_lora import quantize
from gguf_lora.cli import _progress, app


def test_library_reports_bytes_up_to_the_file_size(llama_base, tmp_path):
    calls = []
    result = quantize(llama_base[1], tmp_path / "q8.gguf", "q8_0", progress=lambda *a: calls.append(a))
    done = [c[0] for c in calls]
    assert len(calls) == result.tensors and done == sorted(done) and done[0] > 0
    assert {c[1] for c in calls} == {result.bytes} and done[-1] == result.bytes
    assert calls[-1][2] == "output.weight" or calls[-1][2].endswith(".weight")


def test_bar_shows_throughput_and_time_left():
    out = io.StringIO()
    bar, update = _progress(True, Console(file=out, force_terminal=True, width=160))
    with bar:
        update(5_000_000, 20_000_000, "blk.0.ffn_up.weight")
        time.sleep(0.3)
        update(10_000_000, 20_000_000, "blk.0.ffn_down.weight")
        bar.refresh()
        text = out.getvalue()
    assert "blk.0.ffn_down.weight" in text and "10.0/20.0 MB" in text
    assert "MB/s" in text and "eta" in text and "0:00:" in text


def test_no_bar_when_not_a_terminal_or_json(llama_base, tmp_path):
    assert _progress(False) == (None, None)
    r = CliRunner().invoke(app, ["quantize", str(llama_base[1]), str(tmp_path / "q.gguf"), "q8_0"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("wrote ") and "MB/s" not in r.output and "\x1b[" not in r.output
