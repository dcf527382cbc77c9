"""Fuzzing every file format gguf-lora parses, through the CLI a user runs.

Generated safetensors headers, adapter configs, HF config.json files, GGUF metadata values, GGUF bytes
overwritten at random, and files truncated at every offset class. For every case the command either
succeeds with a file llama.cpp's own loader accepts (a sample is loaded by llama-quantize / llama-export-lora)
or exits 1 with one line of error and no traceback; inputs are never modified; nothing is left behind on
failure; and it finishes in bounded time. See fuzz_support.py for the settings and the tally.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fuzz_support as fz
import tiny
from gguf_lora import convert

pytestmark = pytest.mark.llama_cpp


# ---- worlds ---------------------------------------------------------------------------------------------


class World:
    def __init__(self, hf: Path, base: Path, adapter: Path, lora: Path, root: Path):
        self.hf, self.base, self.adapter, self.lora, self.root = hf, base, adapter, lora, root
        self.header, self.data = _split_safetensors((adapter / "adapter_model.safetensors").read_bytes())
        self.config = json.loads((adapter / "adapter_config.json").read_text())
        self.hf_config = json.loads((hf / "config.json").read_text())


@pytest.fixture(scope="module")
def world(llama_base, tmp_path_factory):
    hf, base = llama_base
    root = tmp_path_factory.mktemp("fuzz-files")
    adapter = tiny.make_adapter(hf, root / "adapter", r=4, lora_alpha=8,
                                target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    lora = Path(convert(adapter, base, root / "lora.gguf").output)
    return World(hf, base, adapter, lora, root)


@contextmanager
def case(w: World):
    """A fresh folder per generated case (Hypothesis runs many cases per test function)."""
    folder = Path(tempfile.mkdtemp(dir=w.root, prefix="case-"))
    (folder / "out").mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _safetensors(header_bytes: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data


# ---- strategies -----------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["F32", "F16", "BF16", "I64", "F8_E4M3", "", "LORA", "lora", "q_proj", "8", "nan"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
deep_json = st.integers(50, 200_000).flatmap(
    lambda d: st.sampled_from(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d, "[" * d]))

REGEX_PIECES = ["q_proj", "v_proj", "k_proj", "down_proj", "layers", "self_attn", "mlp", "model", "0", "1", ".",
                r"\.", "*", "+", "?", "|", "(", ")", "[", "]", "[01]", "^", "$", r"\d", r"\d+", "{2}", "{1,3}",
                "(?i)", "(?:", "(?=", "\\", ".*", "(.*)*", "(a|a)*", "{e<=1}", "[[:alpha:]]", "(?P<x>", "(?P=x)"]
regex_keys = st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=6).map("".join) | st.text(max_size=10)


@st.composite
def safetensors_files(draw, w: World) -> bytes:
    kind = draw(st.sampled_from(["entry", "entry", "entry", "header", "deep", "raw", "length", "cut", "names",
                                 "benign"]))
    header = json.loads(json.dumps(w.header))
    names = [k for k in header if k != "__metadata__"]
    if kind == "benign":  # other spacing, key order and metadata strings: still a valid file
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3))
        order = draw(st.permutations(list(header)))
        return _safetensors(json.dumps({k: header[k] for k in order}, indent=draw(st.sampled_from([None, 1, 4])))
                            .encode(), w.data)
    if kind == "entry":  # one field of one tensor entry replaced, deleted, or the entry itself replaced
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra", "whole", "meta"]))
        if how in ("dtype", "shape", "data_offsets"):
            header[name][how] = draw(json_values | st.lists(st.integers(-5, 2**64), max_size=5))
        elif how == "drop":
            del header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif how == "extra":
            header[draw(st.text(max_size=30))] = draw(json_values)
        elif how == "whole":
            header[name] = draw(json_values)
        else:
            header["__metadata__"] = draw(json_values)
        return _safetensors(json.dumps(header).encode(), w.data)
    if kind == "header":  # a valid JSON document of any shape: [1,2,3], null, "x"...
        return _safetensors(json.dumps(draw(json_values)).encode(), w.data)
    if kind == "deep":
        return _safetensors(draw(deep_json).encode(), w.data)
    if kind == "raw":
        return _safetensors(draw(st.binary(max_size=64)), w.data)
    if kind == "length":
        body = json.dumps(header).encode()
        return _safetensors(body, w.data, draw(st.integers(0, 2**64 - 1) | st.integers(0, len(body) + 64)))
    if kind == "cut":
        whole = _safetensors(json.dumps(header).encode(), w.data)
        return whole[:draw(st.integers(0, len(whole)))]
    # names: a tensor renamed to something long, control characters, or a duplicate spelled differently
    name = draw(st.sampled_from(names))
    new = draw(st.sampled_from(["x" * 100_000, "a\nb", name + "\x00", "", name.replace("lora_A", "lora_B")])
               | st.text(max_size=40))
    header[new] = header.pop(name)
    return _safetensors(json.dumps(header).encode(), w.data)


@st.composite
def adapter_configs(draw, w: World) -> str:
    cfg = json.loads(json.dumps(w.config))
    kind = draw(st.sampled_from(["keys", "keys", "patterns", "patterns", "whole", "deep"]))
    if kind == "whole":
        return json.dumps(draw(json_values))
    if kind == "deep":
        return draw(deep_json)
    if kind == "keys":
        keys = ["r", "lora_alpha", "peft_type", "use_rslora", "use_dora", "target_modules", "modules_to_save",
                "layer_replication", "base_model_name_or_path", "alora_invocation_tokens", "rank_pattern",
                "alpha_pattern", "lora_bias", "bias", "target_parameters"]
        for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
            if draw(st.booleans()):
                cfg.pop(key, None)
            else:
                cfg[key] = draw(json_values | st.sampled_from([4, 8, 4.0, 0, -1, True, "4", [4], {"q_proj": 2}]))
        return json.dumps(cfg)
    for key in ("rank_pattern", "alpha_pattern"):
        if draw(st.booleans()):
            cfg[key] = draw(st.dictionaries(regex_keys, st.sampled_from([4, 2, 8, 1, 0, -2, 3.5, "4", None, True])
                                            | json_values, max_size=3))
    return json.dumps(cfg)


GGUF_KEYS = ["general.architecture", "general.type", "general.alignment", "split.count", "llama.block_count",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.context_length",
             "tokenizer.ggml.tokens", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "adapter.type",
             "adapter.lora.alpha", "gguf_lora.fuzz"]
V = gguf.GGUFValueType
_INT_RANGES = {V.UINT8: (0, 255), V.INT8: (-128, 127), V.UINT16: (0, 2**16 - 1), V.INT16: (-2**15, 2**15 - 1),
               V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
               V.INT64: (-2**63, 2**63 - 1)}


def typed_values(vtype: gguf.GGUFValueType):
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        return st.integers(lo, hi) | st.integers(max(lo, -2), min(hi, 600))
    if vtype in (V.FLOAT32, V.FLOAT64):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if vtype == V.FLOAT32 else 64)
    if vtype == V.BOOL:
        return st.booleans()
    return st.text(max_size=40) | st.sampled_from(["llama", "qwen2", "adapter", "model", "lora", "L", ""])


@st.composite
def metadata_edits(draw) -> list[tuple[str, object]]:
    """(key, None) deletes it; (key, (vtype, sub, value)) sets it to a value of any GGUF type."""
    edits = []
    for key in draw(st.lists(st.sampled_from(GGUF_KEYS), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            edits.append((key, None))
            continue
        vtype = draw(st.sampled_from([t for t in V if t != V.ARRAY] + [V.ARRAY, V.ARRAY]))
        if vtype == V.ARRAY:
            sub = draw(st.sampled_from([t for t in V if t != V.ARRAY]))
            value = draw(st.lists(typed_values(sub), max_size=6))
        else:
            sub, value = None, draw(typed_values(vtype))
        edits.append((key, (vtype, sub, value)))
    return edits


def rewrite_gguf(src: Path, dst: Path, edits: list[tuple[str, object]]) -> bool:
    """Copy a GGUF with metadata edits, written by gguf-py (our reader is not involved). False when gguf-py
    itself cannot write the combination."""
    reader = gguf.GGUFReader(src)
    fields = {f.name: f for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    arch = fields["general.architecture"].contents()
    try:
        writer = gguf.GGUFWriter(dst, arch)
        kv = {}
        for name, f in fields.items():
            vtype = f.types[0]
            kv[name] = (vtype, f.types[-1] if vtype == V.ARRAY else None, f.contents())
        for key, change in edits:
            if change is None:
                kv.pop(key, None)
            else:
                kv[key] = change
        writer.kv_data[0].clear()
        for key, (vtype, sub, value) in kv.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in reader.tensors:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return True
    except (ValueError, TypeError, OverflowError, struct.error, KeyError):
        dst.unlink(missing_ok=True)
        return False


def structure_offsets(path: Path) -> list[int]:
    """Every place where one GGUF structure ends and the next begins (each part of each key-value and tensor
    info, the data section, each tensor's data), read by gguf-py."""
    reader = gguf.GGUFReader(path)
    offsets = {0, 4, 8, 16, 24, len(reader.data)}
    for f in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        pos = f.offset
        offsets.add(pos)
        for part in f.parts:
            pos += part.nbytes
            offsets.add(pos)
    for t in reader.tensors:
        offsets |= {t.data_offset, t.data_offset + t.n_bytes // 2, t.data_offset + t.n_bytes}
    return sorted(offsets)


# ---- llama.cpp as the judge of success ------------------------------------------------------------------


def judge_model(prop: str, source: Path, out: Path, tmp: Path) -> None:
    """Our output must load in llama.cpp whenever our input does (a sample of successes is checked)."""
    assert out.is_file()
    gguf.GGUFReader(out)  # gguf-py reads every tensor
    if fz.llama_cpp_sample(prop):
        ok, log = fz.llama_cpp_loads_model(out, tmp)
        if not ok:
            input_ok, _ = fz.llama_cpp_loads_model(source, tmp)
            assert not input_ok, f"llama.cpp loads the input but refuses our output:\n{log}"
            fz.record(prop, "ok-but-input-unloadable-by-llama.cpp-too")


def judge_adapter(prop: str, base: Path, out: Path, tmp: Path) -> None:
    assert out.is_file()
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            assert np.isfinite(data).all(), f"{t.name} holds Inf/NaN"
    if fz.llama_cpp_sample(prop):
        ok, log = fz.llama_cpp_loads_adapter(base, out, tmp)
        assert ok, f"llama.cpp refuses our adapter:\n{log}"


# ---- properties -----------------------------------------------------------------------------------------

def _adapter_copy(w: World, folder: Path) -> Path:
    a = folder / "adapter"
    shutil.copytree(w.adapter, a)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # only --base counts
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


@fz.seed_decorator()
@fz.fuzz(120)
@given(data=st.data())
def test_safetensors_headers(world, data):
    with case(world) as folder:
        a = _adapter_copy(world, folder)
        (a / "adapter_model.safetensors").write_bytes(data.draw(safetensors_files(world)))
        out = folder / "out" / "a.gguf"
        if fz.run_cli("convert: safetensors header", ["convert", a, "--base", world.base, "-o", out],
                      inputs=[a, world.base], out_dir=folder / "out") is None:
            judge_adapter("convert: safetensors header", world.base, out, folder)


@fz.seed_decorator()
@fz.fuzz(150)
@given(data=st.data())
def test_adapter_configs(world, data, monkeypatch_module):
    with case(world) as folder:
        a = _adapter_copy(world, folder)
        (a / "adapter_config.json").write_text(data.draw(adapter_configs(world)))
        out = folder / "out" / "a.gguf"
        command = data.draw(st.sampled_from(["convert", "convert", "inspect", "merge"]))
        args = {"convert": ["convert", a, "--base", world.base, "-o", out],
                "inspect": ["inspect", a],
                "merge": ["merge", "--base", world.base, a, "-o", out, "--outtype", "q8_0"]}[command]
        line = fz.run_cli(f"{command}: adapter_config.json", args, inputs=[a, world.base], out_dir=folder / "out")
        if line is None and command == "convert":
            judge_adapter("convert: adapter_config.json", world.base, out, folder)
        elif line is None and command == "merge":
            judge_model("merge: adapter_config.json", world.base, out, folder)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A shorter regex deadline in the fuzz run (the mechanism is the same; catastrophic keys cost 1 s, not 5)."""
    import gguf_lora.patterns as patterns

    saved = patterns.DEADLINE
    patterns.DEADLINE = 1.0
    yield
    patterns.DEADLINE = saved


@fz.seed_decorator()
@fz.fuzz(80)
@given(data=st.data())
def test_hf_config_json(world, data):
    with case(world) as folder:
        cfg = json.loads(json.dumps(world.hf_config))
        kind = data.draw(st.sampled_from(["keys", "keys", "keys", "whole", "deep"]))
        if kind == "keys":
            for key in data.draw(st.lists(st.sampled_from(
                    ["architectures", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "tie_word_embeddings", "text_config", "hidden_size"]), min_size=1, max_size=3, unique=True)):
                if data.draw(st.booleans()):
                    cfg.pop(key, None)
                else:
                    cfg[key] = data.draw(json_values | st.sampled_from(
                        ["LlamaForCausalLM", ["LlamaForCausalLM"], 2, 4, 0, 513, 3, {"num_hidden_layers": 2}]))
            text = json.dumps(cfg)
        else:
            text = json.dumps(data.draw(json_values)) if kind == "whole" else data.draw(deep_json)
        (folder / "config.json").write_text(text)
        out = folder / "out" / "a.gguf"
        if fz.run_cli("convert --base config.json", ["convert", world.adapter, "--base", folder / "config.json",
                                                     "-o", out], inputs=[world.adapter, folder / "config.json"],
                      out_dir=folder / "out") is None:
            judge_adapter("convert --base config.json", world.base, out, folder)


COMMANDS = ["quantize", "inspect", "convert", "merge", "modelfile"]


def _gguf_commands(w: World, base: Path, folder: Path, command: str) -> list:
    out = folder / "out" / "o.gguf"
    return {"quantize": ["quantize", base, out, "q8_0"],
            "inspect": ["inspect", base],
            "convert": ["convert", w.adapter, "--base", base, "-o", out],
            "merge": ["merge", "--base", base, w.lora, "-o", out, "--outtype", "f16"],
            "modelfile": ["modelfile", "--from", "tiny", "--template-from", base, "-o", folder / "out" / "Modelfile"],
            }[command]


def _judge_gguf_command(prop: str, command: str, w: World, base: Path, folder: Path) -> None:
    out = folder / "out" / "o.gguf"
    if command in ("quantize", "merge"):
        judge_model(prop, base, out, folder)
    elif command == "convert":
        judge_adapter(prop, w.base, out, folder)


@fz.seed_decorator()
@fz.fuzz(120)
@given(edits=metadata_edits(), command=st.sampled_from(COMMANDS))
def test_gguf_metadata_values(world, edits, command):
    with case(world) as folder:
        base = folder / "base.gguf"
        assume(rewrite_gguf(world.base, base, edits))
        prop = f"{command}: GGUF metadata"
        if fz.run_cli(prop, _gguf_commands(world, base, folder, command), inputs=[base, world.adapter, world.lora],
                      out_dir=folder / "out") is None:
            _judge_gguf_command(prop, command, world, base, folder)


@fz.seed_decorator()
@fz.fuzz(120)
@given(data=st.data(), command=st.sampled_from(COMMANDS))
def test_gguf_bytes_overwritten(world, data, command):
    """Counts, lengths, types, dimensions and offsets replaced by random bytes anywhere before the data."""
    with case(world) as folder:
        raw = bytearray(world.base.read_bytes())
        header_end = gguf.GGUFReader(world.base).tensors[0].data_offset
        offsets = structure_offsets(world.base)
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.sampled_from([o for o in offsets if o < header_end]) | st.integers(0, header_end - 1))
            chunk = data.draw(st.binary(min_size=1, max_size=8)
                              | st.sampled_from([b"\xff" * 8, b"\x00" * 8, struct.pack("<Q", 2**40), b"\x7f\xff"]))
            raw[at:at + len(chunk)] = chunk
        base = folder / "base.gguf"
        base.write_bytes(bytes(raw))
        prop = f"{command}: GGUF bytes"
        if fz.run_cli(prop, _gguf_commands(world, base, folder, command), inputs=[base, world.adapter, world.lora],
                      out_dir=folder / "out") is None:
            _judge_gguf_command(prop, command, world, base, folder)


def truncation_cases(path: Path) -> list[int]:
    """Every offset class, each where it first and last occurs, and one byte either side: the header's
    fields, each part of a key-value pair by value type (key length, key, type, value; array type, count,
    elements), each part of a tensor info, the alignment padding, and the start, middle and end of tensor
    data."""
    reader = gguf.GGUFReader(path)
    classes: dict[tuple, list[int]] = {}
    for i, pos in enumerate((0, 4, 8, 16, 24)):
        classes[("header", i)] = [pos]
    for kind, fields in (("kv", list(reader.fields.values())), ("tensor info", [t.field for t in reader.tensors])):
        for f in fields:
            pos = f.offset
            for j, part in enumerate(f.parts):
                label = (kind, tuple(int(t) for t in f.types), min(j, 6))
                classes.setdefault(label, []).append(pos)
                pos += part.nbytes
            classes.setdefault((kind, "end"), []).append(pos)
    for i, t in enumerate(reader.tensors):
        for where, pos in (("start", t.data_offset), ("middle", t.data_offset + t.n_bytes // 2),
                           ("end", t.data_offset + t.n_bytes)):
            classes.setdefault(("data", where), []).append(pos)
    size = path.stat().st_size
    picks = {p for offsets in classes.values() for p in (offsets[0], offsets[-1])} | {size - 1}
    return sorted({p + d for p in picks for d in (-1, 0, 1) if 0 <= p + d < size})


@pytest.mark.parametrize("which", ["base", "lora"])
def test_truncated_at_every_offset_class(world, which):
    """Exhaustive over the offset classes (not sampled): base GGUF through quantize and modelfile, the GGUF
    LoRA through merge and inspect; a file cut anywhere is refused in one line or, cut only in its final
    padding, still works."""
    src = world.base if which == "base" else world.lora
    raw = src.read_bytes()
    commands = ["quantize", "modelfile"] if which == "base" else ["merge", "inspect"]
    for i, cut in enumerate(truncation_cases(src)):
        with case(world) as folder:
            f = folder / src.name
            f.write_bytes(raw[:cut])
            command = commands[i % 2]
            if which == "base":
                args = _gguf_commands(world, f, folder, command)
            else:
                args = (["merge", "--base", world.base, f, "-o", folder / "out" / "o.gguf"] if command == "merge"
                        else ["inspect", f])
            prop = f"{command}: truncated {which}"
            line = fz.run_cli(prop, args, inputs=[f, world.base], out_dir=folder / "out")
            if line is None:
                assert cut >= len(raw) - 64, f"a file cut at {cut} of {len(raw)} bytes was accepted"


@fz.seed_decorator()
@fz.fuzz(60)
@given(data=st.data())
def test_truncated_safetensors_anywhere(world, data):
    with case(world) as folder:
        a = _adapter_copy(world, folder)
        raw = (a / "adapter_model.safetensors").read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        (a / "adapter_model.safetensors").write_bytes(raw[:cut])
        line = fz.run_cli("convert: truncated safetensors", ["convert", a, "--base", world.base, "-o",
                                                               folder / "out" / "a.gguf"],
                          inputs=[a, world.base], out_dir=folder / "out")
        assert line is not None, f"a safetensors file cut at {cut} of {len(raw)} bytes was accepted"


# What a command line can carry: no NUL (execve ends arguments there). Bytes that are not UTF-8 reach Python
# as lone surrogates; CliRunner's strict output cannot print them back, so they are left to a test that runs
# the command in a process (test_hostile.py::test_paths_typed_with_bytes_that_are_not_utf8). Lines are counted
# on "\n" (str.splitlines also splits on \x1c-\x1e).
argv_text = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
path_args = st.one_of(
    st.text(argv_text, max_size=30), st.text(argv_text, max_size=300),
    st.sampled_from(["a" * 300, "a/" * 2100, "~nosuchuser/x", "", ".", "..", "/", "/dev/null", "-",
                     "--x", "out.gguf", "dir/", "adapter:0.5", "adapter:abc", "adapter:nan", "adapter:-1e39"]))
SLOTS = {"convert": ["adapter", "--base", "-o", "--outtype"], "merge": ["--base", "adapter", "-o", "--outtype"],
         "quantize": ["source", "output", "outtype"], "inspect": ["path", "--base"],
         "modelfile": ["--from", "--adapter", "--template-from", "-o"]}


@fz.seed_decorator()
@fz.fuzz(120)
@given(command=st.sampled_from(sorted(SLOTS)), data=st.data())
def test_command_line_arguments(world, command, data):
    """Whatever the user types where a path, a scale or a type goes: exit 0, 1 (one line) or 2 (usage)."""
    with case(world) as folder:
        shutil.copytree(world.adapter, folder / "adapter")
        shutil.copy(world.base, folder / "base.gguf")
        good = {"adapter": "adapter", "--base": "base.gguf", "-o": "out/o.gguf", "--outtype": "q8_0",
                "source": "base.gguf", "output": "out/o.gguf", "outtype": "q8_0", "path": "adapter",
                "--from": "tiny", "--adapter": "adapter", "--template-from": "base.gguf"}
        slot = data.draw(st.sampled_from(SLOTS[command]))
        values = {s: good[s] for s in SLOTS[command]}
        values[slot] = data.draw(path_args)
        if command == "modelfile":
            values["-o"] = values["-o"].replace("o.gguf", "Modelfile") if slot != "-o" else values["-o"]
            values.pop("--adapter") if slot != "--adapter" else None
        args = [command]
        for s, v in values.items():
            args += [s, v] if s.startswith("-") else [v]
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            before = fz.digest([folder / "adapter", folder / "base.gguf"])
            result = fz.runner.invoke(fz.app, args)
            assert fz.digest([folder / "adapter", folder / "base.gguf"]) == before
        finally:
            os.chdir(cwd)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback

            raise AssertionError("".join(traceback.format_exception(result.exception)))
        assert result.exit_code in (0, 1, 2), result.output
        last = result.output.rstrip().split("\n")[-1] if result.output.strip() else ""
        if command == "inspect" and result.exit_code == 1 and last.startswith("fits ") and ": no: " in last:
            fz.record("command-line arguments", "inspect report: does not fit (exit 1)")
        elif result.exit_code == 1:
            lines = [ln for ln in result.output.split("\n") if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), result.output
            leftovers = [p.name for p in (folder / "out").iterdir()]
            assert leftovers == [], leftovers
            fz.record("command-line arguments", "refused", lines[0][7:])
        else:
            fz.record("command-line arguments", {0: "ok", 2: "usage error (exit 2)"}[result.exit_code])
        assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")]
