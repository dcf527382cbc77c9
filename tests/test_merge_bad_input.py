"""merge / quantize on bad input: one-line error, exit 1, nothing written."""
from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

import tiny
from gguf_lora.cli import app
from test_bad_input import run_fails

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(llama_base, tmp_path_factory):
    return tiny.make_adapter(llama_base[0], tmp_path_factory.mktemp("m") / "a", r=4)


def test_merge_cli_json_and_provenance(llama_base, adapter, tmp_path):
    out = tmp_path / "m.gguf"
    lora = tmp_path / "a.gguf"
    assert runner.invoke(app, ["convert", str(adapter), "--base", str(llama_base[1]), "-o", str(lora)]).exit_code == 0
    result = runner.invoke(app, ["merge", "--base", str(llama_base[1]), f"{adapter}:0.5", f"{lora}:0.25", "-o", str(out),
                                 "--outtype", "q8_0", "--json"])
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    assert doc["merged_tensors"] == 14 and doc["types"] == {"Q8_0": 16, "F32": 5}
    assert [a["scale"] for a in doc["adapters"]] == [0.5, 0.25]
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert reader.fields["gguf_lora.adapter_scales"].contents() == [0.5, 0.25]
    assert reader.fields["tokenizer.ggml.model"].contents() == gguf.GGUFReader(llama_base[1]).fields[
        "tokenizer.ggml.model"].contents()


def test_unknown_type(llama_base, tmp_path):
    run_fails(["quantize", llama_base[1], tmp_path / "o.gguf", "q3_x"], "Unknown output type", out=tmp_path / "o.gguf")


def test_base_not_matching_adapter(tmp_path, llama_base):
    hf = tmp_path / "wide"
    tiny.make_base("llama", hf, hidden_size=96, intermediate_size=160)
    a = tiny.make_adapter(hf, tmp_path / "wide-lora", r=4)
    run_fails(["merge", "--base", llama_base[1], a, "-o", tmp_path / "o.gguf"], "shape", out=tmp_path / "o.gguf")


def test_gguf_lora_of_another_arch(tmp_path, llama_base):
    from llamacpp import hf_to_gguf

    hf = tmp_path / "qwen2"
    tiny.make_base("qwen2", hf)
    base = hf_to_gguf(hf, tmp_path / "qwen2.gguf")
    a = tiny.make_adapter(hf, tmp_path / "qa", r=4)
    assert runner.invoke(app, ["convert", str(a), "--base", str(base), "-o", str(tmp_path / "q.gguf")]).exit_code == 0
    run_fails(["merge", "--base", llama_base[1], tmp_path / "q.gguf", "-o", tmp_path / "o.gguf"], "qwen2", "llama",
              out=tmp_path / "o.gguf")


def test_split_base(tmp_path, llama_base):
    reader = gguf.GGUFReader(llama_base[1])
    split = tmp_path / "base-00001-of-00002.gguf"
    w = gguf.GGUFWriter(split, "llama")
    w.add_uint16("split.count", 2)
    w.add_uint32("llama.block_count", 2)
    w.add_uint32("llama.attention.head_count", 4)
    t = reader.tensors[0]
    w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    run_fails(["quantize", split, tmp_path / "o.gguf", "q8_0"], "split", out=tmp_path / "o.gguf")


def test_nan_from_merge_names_the_tensor(llama_base, adapter, tmp_path):
    run_fails(["merge", "--base", llama_base[1], f"{adapter}:1e38", "-o", tmp_path / "o.gguf"], "NaN/Inf", "blk.",
              out=tmp_path / "o.gguf")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A llama with rows of 256, so that K-quants and IQ types apply."""
    from llamacpp import hf_to_gguf

    root = tmp_path_factory.mktemp("wide")
    tiny.make_base("llama", root / "hf", hidden_size=256, intermediate_size=512, head_dim=64)
    return root / "hf", hf_to_gguf(root / "hf", root / "f32.gguf")


def test_same_on_a_k_quant_base_requantizes_only_merged_tensors(wide, tmp_path):
    from llamacpp import llama_quantize

    hf, f32 = wide
    k = llama_quantize(f32, tmp_path / "k.gguf", "q4_k_m")
    a = tiny.make_adapter(hf, tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "o.gguf"
    assert runner.invoke(app, ["merge", "--base", str(k), str(a), "-o", str(out)]).exit_code == 0
    before = {t.name: t for t in gguf.GGUFReader(k).tensors}
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == before[t.name].tensor_type, t.name
        same = np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(before[t.name].data).view(np.uint8))
        assert same == (not t.name.endswith(("attn_q.weight", "attn_v.weight"))), t.name


def test_requantizing_to_a_type_we_cannot_write(wide, tmp_path):
    """`same` on an IQ4_NL base would have to write IQ4_NL for the merged tensors: refused, nothing written."""
    from llamacpp import llama_quantize

    hf, f32 = wide
    iq = llama_quantize(f32, tmp_path / "iq.gguf", "iq4_nl")
    a = tiny.make_adapter(hf, tmp_path / "a", r=4)
    out = tmp_path / "o.gguf"
    run_fails(["merge", "--base", iq, a, "-o", out], "cannot encode", out=out)
    assert runner.invoke(app, ["merge", "--base", str(iq), str(a), "-o", str(out), "--outtype", "q8_0"]).exit_code == 0


def test_merge_never_overwrites_base(llama_base, adapter, tmp_path):
    base = tmp_path / "b.gguf"
    shutil.copy(llama_base[1], base)
    before = base.read_bytes()
    run_fails(["merge", "--base", base, adapter, "-o", base, "--force"], "one of the inputs")
    assert base.read_bytes() == before


def test_disk_full_mid_merge_leaves_nothing(llama_base, adapter, tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "gguf_lora", "merge", "--base", str(llama_base[1]), str(adapter),
                           "-o", str(out), "--outtype", "f32"], capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 1 and proc.stderr.startswith("error: Writing"), proc.stderr
    assert list(out.parent.iterdir()) == []
