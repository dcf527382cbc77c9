"""Bad input: a clear one-line error, exit 1, and no output file left behind."""
from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import tiny
from gguf_lora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(llama_base, tmp_path_factory):
    hf, _ = llama_base
    return tiny.make_adapter(hf, tmp_path_factory.mktemp("adapter") / "plain", r=4, lora_alpha=8)


def fresh(adapter: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy


def run_fails(args, *needles, out: Path | None = None):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*")), "a temporary file was left behind"
    return lines[0]


def edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_folder(tmp_path, llama_base):
    run_fails(["convert", tmp_path / "nope", "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "does not exist",
              out=tmp_path / "o.gguf")


def test_missing_config(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    (a / "adapter_config.json").unlink()
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "adapter_config.json",
              out=tmp_path / "o.gguf")


def test_missing_weights(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    (a / "adapter_model.safetensors").unlink()
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "adapter_model.safetensors",
              out=tmp_path / "o.gguf")


def test_truncated_safetensors(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    p = a / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "truncated",
              out=tmp_path / "o.gguf")


def test_corrupt_safetensors_header(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    p = a / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"garbage!!!!!"
    p.write_bytes(bytes(data))
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "not a readable safetensors",
              out=tmp_path / "o.gguf")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GGUF_LORA_PWNED']}",))


def test_pickle_with_code_is_refused_and_not_run(adapter, tmp_path, llama_base, monkeypatch):
    a = fresh(adapter, tmp_path)
    (a / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GGUF_LORA_PWNED", str(marker))
    with open(a / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "cannot be loaded safely",
              out=tmp_path / "o.gguf")
    assert not marker.exists()


def test_bin_adapter_is_read_with_weights_only(adapter, tmp_path, llama_base):
    import torch

    a = fresh(adapter, tmp_path)
    tensors = load_file(a / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()
    result = runner.invoke(app, ["convert", str(a), "--base", str(llama_base[1]), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("peft_type", ["IA3", "PREFIX_TUNING"])
def test_unknown_peft_type(adapter, tmp_path, llama_base, peft_type):
    a = fresh(adapter, tmp_path)
    edit_config(a, peft_type=peft_type)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], peft_type, "not LoRA",
              out=tmp_path / "o.gguf")


def test_target_not_in_base(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)

    def rename(t):
        for k in [k for k in t if "layers.0.self_attn.q_proj" in k]:
            t[k.replace("q_proj", "rotary_proj")] = t.pop(k)

    edit_tensors(a, rename)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "rotary_proj",
              out=tmp_path / "o.gguf")


def test_fused_or_unknown_target_refused_by_name(tmp_path, llama_base):
    """A phi3 adapter (fused qkv_proj) on a llama base is refused by module name, not guessed."""
    hf = tmp_path / "phi3"
    tiny.make_base("phi3", hf)
    a = tiny.make_adapter(hf, tmp_path / "phi3-lora", r=4)
    edit_config(a, base_model_name_or_path=None)  # nothing but the module names to go by
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "gate_up_proj", "fused",
              out=tmp_path / "o.gguf")


def test_shape_mismatch_wrong_base(tmp_path, llama_base):
    hf = tmp_path / "wide"
    tiny.make_base("llama", hf, hidden_size=96, intermediate_size=160)
    a = tiny.make_adapter(hf, tmp_path / "wide-lora", r=4)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "shape", "another model size",
              out=tmp_path / "o.gguf")


def test_wrong_architecture(tmp_path, llama_base):
    """A qwen2 adapter carries the same module names as llama: its recorded base's architecture gives it away."""
    hf = tmp_path / "qwen2"
    tiny.make_base("qwen2", hf)
    a = tiny.make_adapter(hf, tmp_path / "qwen2-lora", r=4)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "qwen2", "llama",
              out=tmp_path / "o.gguf")


def test_gguf_given_as_adapter(tmp_path, llama_base):
    run_fails(["convert", llama_base[1], "--base", llama_base[0], "-o", tmp_path / "o.gguf"], "is a GGUF file",
              out=tmp_path / "o.gguf")


def test_adapter_given_as_base(adapter, tmp_path):
    run_fails(["convert", adapter, "--base", adapter, "-o", tmp_path / "o.gguf"], "is a PEFT adapter folder",
              out=tmp_path / "o.gguf")


def test_gguf_adapter_given_as_base(adapter, tmp_path, llama_base):
    lora = tmp_path / "a.gguf"
    assert runner.invoke(app, ["convert", str(adapter), "--base", str(llama_base[1]), "-o", str(lora)]).exit_code == 0
    run_fails(["convert", adapter, "--base", lora, "-o", tmp_path / "o.gguf"], "is a GGUF LoRA adapter",
              out=tmp_path / "o.gguf")


def test_output_in_missing_folder(adapter, tmp_path, llama_base):
    run_fails(["convert", adapter, "--base", llama_base[1], "-o", tmp_path / "no" / "o.gguf"], "does not exist")
    assert not (tmp_path / "no").exists()


def test_existing_output_needs_force(adapter, tmp_path, llama_base):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    run_fails(["convert", adapter, "--base", llama_base[1], "-o", out], "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert runner.invoke(app, ["convert", str(adapter), "--base", str(llama_base[1]), "-o", str(out),
                               "--force"]).exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_never_overwrites_an_input(adapter, tmp_path, llama_base):
    base_copy = tmp_path / "base.gguf"
    shutil.copy(llama_base[1], base_copy)
    before = base_copy.read_bytes()
    run_fails(["convert", adapter, "--base", base_copy, "-o", base_copy, "--force"], "one of the inputs")
    assert base_copy.read_bytes() == before


def test_no_base_says_which_flag(adapter, tmp_path):
    a = fresh(adapter, tmp_path)
    edit_config(a, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    run_fails(["convert", a, "-o", tmp_path / "o.gguf"], "--base", "meta-llama/Llama-3.2-1B",
              out=tmp_path / "o.gguf")


def test_nan_in_weights_names_the_tensor(adapter, tmp_path, llama_base):
    a = fresh(adapter, tmp_path)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][0, 0] = np.nan

    edit_tensors(a, poison)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], key, "NaN",
              out=tmp_path / "o.gguf")


@pytest.mark.parametrize("feature,lora,needle", [
    ("dora", dict(use_dora=True), "DoRA"),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ("lora_bias", dict(lora_bias=True), "lora_bias"),
])
def test_features_a_lora_file_cannot_carry(llama_base, tmp_path, feature, lora, needle):
    a = tiny.make_adapter(llama_base[0], tmp_path / feature, r=4, **lora)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], needle, "gguf-lora merge",
              out=tmp_path / "o.gguf")


def test_disk_full_mid_write_leaves_nothing(adapter, tmp_path, llama_base):
    """A real write failure: the file size limit is hit part-way through the tensors (EFBIG, like ENOSPC)."""
    out = tmp_path / "o.gguf"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, "-m", "gguf_lora", "convert", str(adapter), "--base", str(llama_base[1]),
                           "-o", str(out)], capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: Writing") and "nothing was written" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_interruption_mid_write_leaves_nothing(adapter, tmp_path, llama_base, monkeypatch):
    import importlib

    convert_mod = importlib.import_module("gguf_lora.convert")

    real = convert_mod.pair_arrays
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "pair_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(adapter, llama_base[1], tmp_path / "o.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,needle", [("scaled", "differs from the base"), ("resized", "resized")])
def test_saved_embedding_copy_must_equal_the_base(llama_base, tmp_path, change, needle):
    """PEFT saves embed_tokens next to an embedding LoRA; a trained or resized one cannot go into a LoRA file."""
    a = tiny.make_adapter(llama_base[0], tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"

    def edit(t):
        t[key] = t[key] * 1.5 if change == "scaled" else np.concatenate([t[key], t[key][:4]])

    assert runner.invoke(app, ["convert", str(a), "--base", str(llama_base[1]), "-o",
                               str(tmp_path / "ok.gguf")]).exit_code == 0
    edit_tensors(a, edit)
    run_fails(["convert", a, "--base", llama_base[1], "-o", tmp_path / "o.gguf"], "embed_tokens", needle,
              out=tmp_path / "o.gguf")
