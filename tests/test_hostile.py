"""The examples of issue 14, each pinned: hostile or careless input is one clear line (exit 1), never a
traceback, a partial file, a silent infinity or an unbounded wait. The fuzz suite (test_fuzz_*.py) covers
the classes these examples come from; these keep the named cases honest."""
from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import tiny
from gguf_lora import convert
from gguf_lora.cli import app
from gguf_lora.errors import GgufLoraError, InputError, shorten
from test_bad_input import edit_config, fresh, run_fails
from test_fuzz_files import rewrite_gguf

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(llama_base, tmp_path_factory):
    return tiny.make_adapter(llama_base[0], tmp_path_factory.mktemp("hostile") / "plain", r=4, lora_alpha=8)


def write_header(folder: Path, header: bytes) -> None:
    p = folder / "adapter_model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


# ---- tracebacks that became one line ------------------------------------------------------------------------

@pytest.mark.parametrize("header,needle", [(b"[1,2,3]", "not a JSON object"), (b"null", "not a JSON object"),
                                           (b"[" * 100_000 + b"]" * 100_000, "nests too deeply")])
def test_safetensors_header_that_is_not_an_object(adapter, tmp_path, llama_base, header, needle):
    a = fresh(adapter, tmp_path)
    write_header(a, header)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], needle, out=tmp_path / "o.gguf")


def test_deeply_nested_adapter_config(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    (a / "adapter_config.json").write_text('{"r": ' + "[" * 50_000 + "]" * 50_000 + "}")
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "adapter_config.json",
              "nests", out=tmp_path / "o.gguf")


@pytest.mark.parametrize("change,needles", [
    (dict(rank_pattern={"q_proj": "four"}), ["rank_pattern['q_proj']", "'four'", "not a positive integer"]),
    (dict(rank_pattern={"q_proj": 2.5}), ["rank_pattern['q_proj']", "2.5"]),
    (dict(alpha_pattern={"q_proj[": 4}), ["alpha_pattern key 'q_proj['", "not a valid regular expression"]),
    (dict(alpha_pattern={"v_proj": [1]}), ["alpha_pattern['v_proj']", "not a non-negative finite number"]),
    (dict(r="8"), ["r is '8'", "not a positive integer"]),
    (dict(r=True), ["r is True"]),
    (dict(lora_alpha=float("nan")), ["lora_alpha is nan"]),
    (dict(use_rslora="yes"), ["use_rslora is 'yes'", "true or false"]),
    (dict(use_dora=1), ["use_dora is 1"]),
    (dict(target_modules=7), ["target_modules is 7", "a string or a list of strings"]),
    (dict(modules_to_save="lm_head"), ["modules_to_save is 'lm_head'", "a list of strings"]),
    (dict(base_model_name_or_path=["x"]), ["base_model_name_or_path is ['x']"]),
])
def test_config_values_of_the_wrong_type(adapter, tmp_path, llama_base, change, needles):
    a = fresh(adapter, tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg.update(change)
    (a / "adapter_config.json").write_text(json.dumps(cfg))  # NaN is written as Python's json writes it
    line = run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], str(a / "adapter_config.json"),
                     *needles, out=tmp_path / "o.gguf")
    assert line.count(".") >= 2  # what, why or what to do: more than one sentence


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count"])
@pytest.mark.parametrize("command", ["quantize", "convert", "merge"])
def test_base_gguf_without_a_key_it_needs(llama_base, adapter, tmp_path, key, command):
    base = tmp_path / "base.gguf"
    assert rewrite_gguf(llama_base[1], base, [(key, None)])
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    args = {"quantize": ["quantize", base, out, "q8_0"], "convert": ["convert", adapter, "--base", base, "-o", out],
            "merge": ["merge", "--base", base, adapter, "-o", out]}[command]
    run_fails(args, str(base), f"has no {key}", out=out)


@pytest.mark.parametrize("value", [("16", gguf.GGUFValueType.STRING), (0, gguf.GGUFValueType.UINT32),
                                   (10**6, gguf.GGUFValueType.UINT32), (-1, gguf.GGUFValueType.INT32),
                                   (2.0, gguf.GGUFValueType.FLOAT32)])
def test_base_gguf_with_a_wrongly_typed_block_count(llama_base, tmp_path, value):
    base = tmp_path / "base.gguf"
    assert rewrite_gguf(llama_base[1], base, [("llama.block_count", (value[1], None, value[0]))])
    run_fails(["quantize", base, tmp_path / "o.gguf", "q8_0"], "llama.block_count", out=tmp_path / "o.gguf")


@pytest.mark.parametrize("drop", ["num_hidden_layers", "num_attention_heads"])
def test_hf_config_without_a_key(adapter, llama_base, tmp_path, drop):
    cfg = json.loads((llama_base[0] / "config.json").read_text())
    del cfg[drop]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run_fails(["convert", adapter, "--base", tmp_path / "config.json", "-o", tmp_path / "o.gguf"],
              f"has no {drop}", out=tmp_path / "o.gguf")


def test_architectures_given_as_a_string(adapter, llama_base, tmp_path):
    """transformers writes a list; a string names one architecture (it was read as its first letter, 'L')."""
    cfg = json.loads((llama_base[0] / "config.json").read_text())
    cfg["architectures"] = "LlamaForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["convert", str(adapter), "--base", str(tmp_path / "config.json"), "-o",
                                 str(tmp_path / "o.gguf")])
    assert result.exit_code == 0, result.output
    cfg["architectures"] = "GPT2LMHeadModel"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run_fails(["convert", adapter, "--base", tmp_path / "config.json", "-o", tmp_path / "p.gguf"],
              "'GPT2LMHeadModel'", "does not convert yet", out=tmp_path / "p.gguf")


def test_truncated_gguf_to_modelfile_template_from(llama_base, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llama_base[1].read_bytes()[:5000])
    run_fails(["modelfile", "--from", "tiny", "--template-from", cut, "-o", tmp_path / "Modelfile"],
              str(cut), "not a readable GGUF file", "truncated", out=tmp_path / "Modelfile")


# ---- messages that misled -----------------------------------------------------------------------------------

def test_relative_paths_are_printed_as_given(tmp_path, llama_base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = run_fails(["convert", "myadapter", "--base", llama_base[1], "-o", "o.gguf"])
    assert line.startswith("error: myadapter does not exist."), line
    line = run_fails(["inspect", "some/x.gguf"])
    assert line.startswith("error: some/x.gguf does not exist."), line
    line = run_fails(["quantize", "base.gguf", "o.gguf", "q8_0"])
    assert line.startswith("error: Input base.gguf is not a GGUF file."), line


def test_inspect_on_an_empty_file_does_not_say_run_inspect(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    line = run_fails(["inspect", tmp_path / "empty.gguf"], "is empty")
    assert "use 'gguf-lora inspect'" not in line


def test_a_huge_tensor_name_is_shortened_in_the_middle(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    tensors = load_file(a / "adapter_model.safetensors")
    long = "z" * 3000  # under the 4096 limit: it reaches the mapping, whose message names the module
    for key in [k for k in tensors if "layers.0.self_attn.q_proj" in k]:
        tensors[key.replace("q_proj", long + "_proj")] = tensors.pop(key)
    save_file(tensors, a / "adapter_model.safetensors")
    line = run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "characters]…",
                     out=tmp_path / "o.gguf")
    assert len(line) < 1200, len(line)
    tensors["y" * 100_000] = tensors.pop(next(iter(tensors)))
    save_file(tensors, a / "adapter_model.safetensors")
    line = run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "100,000 characters",
                     out=tmp_path / "o.gguf")
    assert len(line) < 1200, len(line)


def test_merge_scale_that_is_not_a_number(adapter, llama_base, tmp_path):
    run_fails(["merge", "--base", llama_base[1], f"{adapter}:abc", "-o", tmp_path / "o.gguf"],
              "Scale 'abc'", "is not a number", f"{adapter}:0.5", out=tmp_path / "o.gguf")
    for bad in ("nan", "inf", "1e400"):
        run_fails(["merge", "--base", llama_base[1], f"{adapter}:{bad}", "-o", tmp_path / "o.gguf"],
                  "not a finite number", out=tmp_path / "o.gguf")


def test_a_path_with_a_colon_is_still_a_path(adapter, llama_base, tmp_path):
    odd = tmp_path / "run:2"
    shutil.copytree(adapter, odd)
    out = tmp_path / "o.gguf"
    result = runner.invoke(app, ["merge", "--base", str(llama_base[1]), str(odd), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapters"][0]["scale"] == 1.0


def test_legacy_torch_bin_is_refused_by_name(adapter, tmp_path, llama_base):
    import torch

    a = fresh(adapter, tmp_path)
    tensors = load_file(a / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, a / "adapter_model.bin",
               _use_new_zipfile_serialization=False)
    (a / "adapter_model.safetensors").unlink()
    line = run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "legacy (non-zip) format",
                     "safetensors", out=tmp_path / "o.gguf")
    assert "mmap" not in line


def test_every_message_starts_as_written():
    """The 'what' of an error is printed as written: so every message literal starts with a capital (or a
    lower-case tool name), and a message that starts with a value (a path) prints it untouched."""
    from gguf_lora import errors

    names = {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, GgufLoraError)}
    names |= {"AdapterIgnoredError", "GGUFError"}
    bad = []
    for path in sorted((ROOT / "gguf_lora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    in names and node.args):
                continue
            first = node.args[0]
            text = (first.value if isinstance(first, ast.Constant) else
                    first.values[0].value if isinstance(first, ast.JoinedStr) and first.values
                    and isinstance(first.values[0], ast.Constant) else None)
            if isinstance(text, str) and text and not (text[0].isupper() or text.startswith(("llama-", "gguf-"))):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text[:40]!r}")
    assert not bad, "messages that start lower-case (capitalise them in the source):\n" + "\n".join(bad)


def test_one_line_and_shortening():
    e = InputError("a\nb " + "n" * 1000, "why\r\n", "fix")
    text = str(e)
    assert "\n" not in text and "\r" not in text and "…[" in text and len(text) < 400
    assert shorten("abc", 10) == "abc" and shorten("x" * 500, 100).count("…") == 2
    assert str(InputError("rel/path does not exist", "it is gone", "pass another")) == \
        "rel/path does not exist. It is gone. Pass another."


# ---- silent infinities --------------------------------------------------------------------------------------

def test_f32_weight_above_f16_range_is_refused(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors = load_file(a / "adapter_model.safetensors")
    tensors[key] = tensors[key].copy()
    tensors[key][3, 1] = 70000.0
    save_file(tensors, a / "adapter_model.safetensors")
    out = tmp_path / "o.gguf"
    run_fails(["convert", a, "--base", llama_base[1], "-o", out], "blk.0.attn_q.weight.lora_b", "7e+04",
              "F16", "65504", "--outtype f32", out=out)
    assert runner.invoke(app, ["convert", str(a), "--base", str(llama_base[1]), "-o", str(out), "--outtype",
                               "f32"]).exit_code == 0


def test_merge_with_a_huge_scale_into_f16_is_refused(adapter, llama_base, tmp_path):
    out = tmp_path / "o.gguf"
    line = run_fails(["merge", "--base", llama_base[1], f"{adapter}:1e30", "-o", out, "--outtype", "f16"],
                     "Tensor blk.", "which F16 cannot hold", "smaller adapter scale", out=out)
    assert "e+" in line


@pytest.mark.parametrize("outtype,value,kind", [("f16", 1e5, "F16"), ("bf16", 3.4e38, "BF16"), ("q8_0", 1e7, "Q8_0"),
                                                ("q4_0", 1e6, "Q4_0")])
def test_quantize_a_base_with_values_beyond_the_type(llama_base, tmp_path, outtype, value, kind):
    reader = gguf.GGUFReader(llama_base[1])
    target = "blk.1.ffn_down.weight"
    base = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(base, "llama")
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            vtype = f.types[0]
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == target:
            data[0, 0] = value
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run_fails(["quantize", base, tmp_path / "o.gguf", outtype], target, kind, out=tmp_path / "o.gguf")


def test_finite_check_is_exact_at_the_f16_boundary():
    """65519.99 rounds to 65504 (finite), 65520 to Inf: the check reads the encoded bits, not a threshold."""
    from gguf_lora.finite import TypeOverflow
    from gguf_lora.quants import encode

    Q = gguf.GGMLQuantizationType
    assert np.isfinite(encode(np.array([[65519.99, -65519.99]], np.float32), Q.F16).view(np.float16)).all()
    with pytest.raises(TypeOverflow) as e:
        encode(np.array([[1.0, 65520.0]], np.float32), Q.F16)
    assert (e.value.lo, e.value.hi, e.value.finite_input) == (1.0, 65520.0, True)
    with pytest.raises(TypeOverflow):
        encode(np.full((1, 32), 9e6, np.float32), Q.Q8_0)  # d = 9e6 / 127 > 65504
    encode(np.full((1, 32), 8e6, np.float32), Q.Q8_0)


@pytest.mark.parametrize("qtype,edge", [("F16", 65520.0), ("BF16", float(np.uint32(0x7F7F8000).view(np.float32))),
                                        ("F32", 3.4028235e38)])
def test_float_boundaries_agree_with_the_encoded_bits(qtype, edge):
    """The float types are checked on the rows (cheap); that must say exactly what the encoded bits say,
    for every value around the rounding boundary, NaN and Inf included."""
    from gguf_lora.finite import TypeOverflow, check, encoded_finite
    from gguf_lora.quants import _encode_rows

    q = gguf.GGMLQuantizationType[qtype]
    up = down = np.float32(edge)
    near = [up]
    for _ in range(40):  # 40 float32 steps either side of the boundary
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        near += [up, down]
    values = np.array(near + [np.inf, np.nan, 1.0, -1.0, 0.0], np.float32)
    for v in np.concatenate([values, -values]):
        rows = np.array([[v, 0.5]], np.float32)
        with np.errstate(all="ignore"):
            encoded = _encode_rows(rows, q)
        try:
            check(encoded, q, rows)
            raised = False
        except TypeOverflow:
            raised = True
        assert raised == (not encoded_finite(encoded, q)), (qtype, float(v))


# ---- unbounded waits ----------------------------------------------------------------------------------------

def test_catastrophic_rank_pattern_is_bounded(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    edit_config(a, rank_pattern={"(.*)*x": 8, "q_proj": 4}, r=4)
    t0 = time.monotonic()
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "rank_pattern key '(.*)*x'",
              "catastrophic backtracking", out=tmp_path / "o.gguf")
    assert time.monotonic() - t0 < 30


class Trickle:
    """Sends status and headers, then one body byte every 2 s, forever (until closed)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.stop = threading.Event()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            while not self.stop.wait(2):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.sock.close()


def test_adapters_list_gives_up_on_a_trickling_server_at_its_deadline():
    """`adapters list` waits 30 s in total, not 30 s per byte."""
    server = Trickle()
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "gguf_lora", "adapters", "list", "--url", server.url],
                              capture_output=True, text=True, timeout=90, env={**os.environ, "PYTHONPATH": str(ROOT)})
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: llama-server at {server.url} did not answer GET /lora-adapters within 30 s.")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert 29 < elapsed < 40, elapsed


def test_library_errors_are_gguf_lora_errors(tmp_path):
    """Hostile values reach the library too: the same errors, no other exception."""
    from gguf_lora.gguf_read import GGUFFile

    (tmp_path / "x.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62))
    with pytest.raises(GgufLoraError, match="claims"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(GgufLoraError):
        convert(tmp_path / "nope", tmp_path / "x.gguf", tmp_path / "o.gguf")


def test_a_bug_is_one_line_too(llama_base, tmp_path):
    """An exception that is not a GgufLoraError is a bug of ours; the command still ends in one line."""
    code = ("import sys, gguf_lora.cli as c, gguf_lora.merge; m = sys.modules['gguf_lora.merge']; "
            "m.merge = lambda *a, **k: {}['boom']; "
            "sys.argv = ['gguf-lora', 'quantize', sys.argv[1], sys.argv[2], 'q8_0']; c.main()")
    proc = subprocess.run([sys.executable, "-c", code, str(llama_base[1]), str(tmp_path / "o.gguf")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ("error: internal error (KeyError: 'boom'). This is a bug in gguf-lora; run again with "
                           "GGUF_LORA_DEBUG=1 and report the traceback.\n")
    debug = subprocess.run([sys.executable, "-c", code, str(llama_base[1]), str(tmp_path / "o.gguf")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                "GGUF_LORA_DEBUG": "1"})
    assert "Traceback" in debug.stderr and "KeyError: 'boom'" in debug.stderr


@pytest.mark.parametrize("key,value", [("adapter.lora.alpha", (gguf.GGUFValueType.UINT32, None, 8)),
                                       ("general.type", (gguf.GGUFValueType.UINT32, None, 1))])
def test_llama_cpp_aborts_on_a_mistyped_adapter_and_we_refuse_it_first(adapter, llama_base, tmp_path, key, value):
    """llama.cpp bug (pinned): gguf_get_val_str / gguf_get_val_f32 GGML_ASSERT the type, so an adapter whose
    general.type or adapter.lora.alpha has another type aborts llama-server and llama-export-lora (SIGABRT)
    instead of being refused. gguf-lora reads adapters with llama.cpp's types and refuses such a file in one
    line (merge, and serve before it starts llama-server)."""
    from gguf_lora.llama_cpp import find_tool

    lora = tmp_path / "lora.gguf"
    convert(adapter, llama_base[1], lora)
    bad = tmp_path / "bad" / "sql.gguf"
    bad.parent.mkdir()
    assert rewrite_gguf(lora, bad, [(key, value)])
    proc = subprocess.run([str(find_tool("llama-export-lora")), "-m", str(llama_base[1]), "--lora", str(bad), "-o",
                           str(tmp_path / "m.gguf")], capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == -6 and "GGML_ASSERT" in proc.stderr, (proc.returncode, proc.stderr[-500:])
    server = subprocess.run([str(find_tool("llama-server")), "-m", str(llama_base[1]), "--lora", str(bad), "--port",
                             "0", "-c", "64"], capture_output=True, text=True, errors="replace", timeout=120)
    assert server.returncode == -6, (server.returncode, server.stderr[-500:])
    run_fails(["merge", "--base", llama_base[1], bad, "-o", tmp_path / "o.gguf"], str(bad), key,
              out=tmp_path / "o.gguf")
    line = run_fails(["serve", "--base", llama_base[1], "--adapters", bad.parent], str(bad))
    assert key in line or "not a GGUF LoRA adapter" in line


def test_paths_typed_with_bytes_that_are_not_utf8(adapter, llama_base, tmp_path):
    """`gguf-lora convert $'ad\\xff'`: Python hands such bytes over as lone surrogates, which no UTF-8 writer
    accepts; they were an internal error when written into a GGUF's metadata or a Modelfile."""
    odd = tmp_path / "ad\udcffx"
    shutil.copytree(adapter, odd)
    for args in (["convert", odd, "--base", llama_base[1], "-o", tmp_path / "o\udcff.gguf"],
                 ["merge", "--base", llama_base[1], odd, "-o", tmp_path / "m.gguf"],
                 ["modelfile", "--from", "tiny\udcff", "-o", tmp_path / "Modelfile"]):
        proc = subprocess.run([sys.executable, "-m", "gguf_lora", *map(os.fsencode, map(str, args))],
                              capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                        "PYTHONIOENCODING": "utf-8:strict"})  # a strict locale
        assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(tmp_path / "o\udcff.gguf").fields["general.name"].contents() == "ad\ufffdx"
    proc = subprocess.run([sys.executable, "-m", "gguf_lora", "inspect", os.fsencode(str(odd))], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8:strict"})
    assert proc.returncode == 0 and proc.stdout.startswith(os.fsencode(str(odd)) + b": peft"), proc.stderr
    assert (tmp_path / "Modelfile").read_bytes() == b"FROM tiny\xff\n"
