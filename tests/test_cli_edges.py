"""The CLI's rough edges, each pinned: help text, usage errors, type names, quantize's own errors, fallbacks,
effective scales in inspect, absolute paths in --json, stable provenance, file types by name, serve's log line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

import tiny
from gguf_lora import convert, merge, quantize
from gguf_lora.cli import app
from gguf_lora.inspect import inspect, render
from gguf_lora.llama_cpp import find_tool, pinned_root
from llamacpp import lora_to_gguf

runner = CliRunner()
TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny"
COMMANDS = [[], ["convert"], ["merge"], ["quantize"], ["inspect"], ["serve"], ["adapters"], ["adapters", "list"],
            ["adapters", "use"], ["modelfile"], ["ollama"], ["ollama", "deploy"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "gguf-lora")
def test_help_shows_no_python_types(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Usage:" in text and "--help" in text
    # what typer >= 0.27 prints: <bool>, <path>, <list[Path]>, {adapter}; and [default: None] from older ones
    assert not re.search(r"<[a-z][a-zA-Z_\[\]|, ]*>|\{[a-z_]+\}|default: None", text), text


def test_serve_usage_shows_llama_server_args():
    text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "120"}).stdout
    assert "Usage: root serve [OPTIONS] [-- LLAMA_SERVER_ARGS...]" in text


def test_help_names_arguments_in_capitals():
    text = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "120"}).stdout
    assert "Usage: root convert [OPTIONS] ADAPTER" in text


def test_adapters_use_without_names_is_a_usage_error():
    """Exit 2 with the usage line, like every error the parser reports (a missing argument, an unknown option)."""
    result = runner.invoke(app, ["adapters", "use", "--url", "http://127.0.0.1:9"])
    missing = runner.invoke(app, ["convert"])
    assert result.exit_code == missing.exit_code == 2
    assert result.stdout == "" and result.stderr.startswith("Usage: root adapters use [OPTIONS] [NAMES]...")
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stderr).split())  # rich draws the message in a box
    assert "Invalid value for NAMES / --none: name the adapters to use, or pass --none for the bare base" in flat
    both = runner.invoke(app, ["adapters", "use", "sql", "--none", "--url", "http://127.0.0.1:9"])
    assert both.exit_code == 2 and "Usage:" in both.stderr


def fails(args: list, words: list[str], absent: list[str] = ()) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    for w in words:
        assert w in line, line
    for w in absent:
        assert w not in line, line
    return line


def test_quantize_errors_speak_of_quantize(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    out = tmp_path / "o.gguf"
    line = fails(["quantize", text, out, "q8_0"], ["is not a GGUF file", "Quantize reads and writes",
                                                   "convert_hf_to_gguf.py HF_MODEL_FOLDER --outfile"],
                 absent=["Base", "merge"])
    assert f"python {pinned_root() / 'src' / 'convert_hf_to_gguf.py'} HF_MODEL_FOLDER" in line  # where it is
    fails(["merge", "--base", TINY / "base-hf", TINY / "adapters" / "sql", "-o", out],
          ["Base", "is not a GGUF file", f"python {pinned_root() / 'src' / 'convert_hf_to_gguf.py'} HF_MODEL_FOLDER"])
    fails(["quantize", TINY / "base.gguf", out, "same"], ["Unknown output type 'same'", "Choose one of f32, "],
          absent=["same,"])
    lora = convert(TINY / "adapters" / "poem", TINY / "base.gguf", tmp_path / "poem.gguf")
    fails(["quantize", lora.output, out, "q8_0"], ["is a GGUF LoRA adapter, not a model", "gguf-lora convert"])
    assert not out.exists()


def test_type_names_are_case_insensitive(tmp_path):
    upper = quantize(TINY / "base.gguf", tmp_path / "upper.gguf", "Q4_K_M")
    lower = quantize(TINY / "base.gguf", tmp_path / "lower.gguf", "q4_k_m")
    assert upper.outtype == "q4_k_m" and (tmp_path / "upper.gguf").read_bytes() == (tmp_path / "lower.gguf").read_bytes()
    result = runner.invoke(app, ["merge", "--base", str(TINY / "base.gguf"), str(TINY / "adapters" / "sql"), "-o",
                                 str(tmp_path / "m.gguf"), "--outtype", "Q8_0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["types"] == {"Q8_0": 16, "F32": 5}
    assert convert(TINY / "adapters" / "sql", TINY / "base.gguf", tmp_path / "a.gguf", outtype="F16").outtype == "f16"


@pytest.mark.llama_cpp
def test_fallback_summary_counts_what_llama_quantize_counts(tmp_path):
    """llama-quantize warns 'N of M tensor(s) required fallback quantization'; the summary says the same N of M."""
    proc = subprocess.run([str(find_tool("llama-quantize")), str(TINY / "base.gguf"), str(tmp_path / "ref.gguf"),
                           "Q4_K_M"], capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counted = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization", proc.stdout + proc.stderr)
    assert counted, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = runner.invoke(app, ["quantize", str(TINY / "base.gguf"), str(tmp_path / "ours.gguf"), "q4_k_m"])
    assert result.exit_code == 0, result.output
    note = [line for line in result.stdout.splitlines() if line.startswith("  note: ")]
    assert note == [f"  note: {counted[1]} of {counted[2]} tensors fell back from Q4_K, Q6_K to Q5_0, Q8_0: their "
                    "rows (64, 128 values) are not a multiple of the type's block, as llama-quantize does"]
    ref = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ref.gguf").tensors}
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    assert ours == ref


def test_no_fallback_note_when_types_fit(tmp_path):
    result = runner.invoke(app, ["quantize", str(TINY / "base.gguf"), str(tmp_path / "q.gguf"), "q8_0", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["fallbacks"] == []


def test_inspect_shows_the_effective_scale_of_each_pair(tmp_path):
    """PEFT's per-module scales (rsLoRA 16/sqrt(8), alpha_pattern 4/sqrt(8)) are folded into lora_b; inspect
    says so and shows them, not alpha / rank for every pair."""
    out = convert(TINY / "adapters" / "sql", TINY / "base.gguf", tmp_path / "sql.gguf").output
    report = inspect(out)
    scales = {p["tensor"]: p["scale"] for p in report["pairs"]}
    assert scales["blk.0.attn_v.weight"] == pytest.approx(4 / 8 ** 0.5)
    assert scales["blk.0.attn_q.weight"] == pytest.approx(16 / 8 ** 0.5)
    assert {p["runtime_scale"] for p in report["pairs"]} == {2.0}
    peft = {p["module"]: p["scale"] for p in inspect(TINY / "adapters" / "sql")["pairs"]}
    assert sorted(scales.values()) == pytest.approx(sorted(peft.values()))
    text = render(report)
    assert "PEFT's scale is folded into lora_b where it is not alpha / rank (16 of 16 pairs)" in text
    assert "  pair blk.0.attn_v.weight                           rank    8  F16   scale 1.41421 " \
           "(alpha / rank 2 x 0.707107 folded)" in text.splitlines()
    plain = render(inspect(convert(TINY / "adapters" / "poem", TINY / "base.gguf", tmp_path / "poem.gguf").output))
    assert "folded" not in plain and "  pair blk.0.attn_v.weight                           rank    8  F16   " \
                                     "scale 2" in plain.splitlines()


@pytest.mark.llama_cpp
def test_inspect_of_a_file_gguf_lora_did_not_write(llama_base, tmp_path):
    """llama.cpp's own convert_lora_to_gguf.py records no PEFT scales: inspect shows alpha / rank, claims no fold."""
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=4, lora_alpha=8)
    report = inspect(lora_to_gguf(folder, llama_base[0], tmp_path / "theirs.gguf", "f16"))
    assert {(p["scale"], p["folded"]) for p in report["pairs"]} == {(2.0, 1.0)}
    assert "folded" not in render(report)


def test_file_type_shown_by_name(tmp_path):
    quantize(TINY / "base.gguf", tmp_path / "q.gguf", "q4_k_m")
    report = inspect(tmp_path / "q.gguf")
    assert report["file_type"] == "Q4_K_M" and report["metadata"]["general.file_type"] == 15
    assert "  general.file_type = 15 (Q4_K_M)" in render(report).splitlines()
    assert "  general.file_type = 1 (F16)" in render(inspect(TINY / "base.gguf")).splitlines()


def test_convert_json_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(TINY)
    result = runner.invoke(app, ["convert", "adapters/sql", "--base", "base.gguf", "-o",
                                 os.path.relpath(tmp_path / "o.gguf", TINY), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["output"] == str(tmp_path / "o.gguf") and doc["base"] == str(TINY / "base.gguf")


def test_merged_metadata_records_adapters_the_same_from_anywhere(tmp_path, monkeypatch):
    """The merged file names each adapter by its folder or file name (with its sha256): the bytes do not depend
    on the folder the command ran in or how the path was typed; the result gives the absolute path."""
    monkeypatch.chdir(TINY)
    here = merge("base.gguf", [("adapters/sql", 1.0), ("./adapters/poem/", 0.5)], tmp_path / "a.gguf", "q8_0")
    monkeypatch.chdir(tmp_path)
    there = merge(TINY / "base.gguf", [(TINY / "adapters" / "sql", 1.0), (TINY / "adapters" / "poem", 0.5)],
                  "b.gguf", "q8_0")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["gguf_lora.adapters"].contents() == ["sql", "poem"]
    assert [a["adapter"] for a in here.adapters] == [str(TINY / "adapters" / n) for n in ("sql", "poem")]
    assert here.output == str(tmp_path / "a.gguf") and there.output == str(tmp_path / "b.gguf")


@pytest.mark.llama_cpp
@pytest.mark.parametrize("keep", [False, True], ids=["temp-log", "--log"])
def test_serve_prints_only_a_log_path_that_stays(tmp_path, keep):
    from gguf_lora.runtime.llama_server import free_port

    log, err = tmp_path / "server.log", ""
    args = [sys.executable, "-m", "gguf_lora", "serve", "--base", str(TINY / "base.gguf"), "--port", str(free_port()),
            *(["--log", str(log)] if keep else [])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline(), proc.stderr.read()  # the ready line
        err = proc.stderr.readline()  # what it says about its log
    finally:
        proc.send_signal(signal.SIGINT)
        err += proc.communicate(timeout=30)[1]
    assert proc.returncode == 0, err
    said = [Path(p) for p in re.findall(r"(/\S+\.log)\b", err)]
    assert all(p.exists() for p in said), err
    assert said == ([log] if keep else []), err
