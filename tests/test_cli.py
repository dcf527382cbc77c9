"""The CLI is a thin client: exit codes, exact stdout shapes, JSON for scripts."""
from __future__ import annotations

import json

import gguf
from typer.testing import CliRunner

import tiny
from gguf_lora.cli import app

runner = CliRunner()


def test_convert_json_document(llama_base, tmp_path):
    folder = tiny.make_adapter(llama_base[0], tmp_path / "sql", r=16, lora_alpha=8, use_rslora=True)
    result = runner.invoke(app, ["convert", str(folder), "--base", str(llama_base[1]), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    out = tmp_path / "sql-lora-f16.gguf"  # default: beside the adapter folder
    assert doc["output"] == str(out) and out.stat().st_size == doc["bytes"]
    assert doc["arch"] == "llama" and doc["ranks"] == [16] and doc["alpha"] == 8.0 and doc["outtype"] == "f16"
    assert doc["tensors"] == 28 and len(doc["folded_scales"]) == 14  # rsLoRA: every module's scale folded
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"


def test_convert_human_summary_and_hf_config_base(llama_base, tmp_path):
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=4)
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((llama_base[0] / "config.json").read_text())
    result = runner.invoke(app, ["convert", str(folder), "--base", str(cfg_only), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'o.gguf'}: llama LoRA, 28 tensors, rank 4, alpha 16, f16, ")
    assert "shapes were not checked" in lines[-1]


def test_default_base_from_adapter_config(llama_base, tmp_path):
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=4)  # base_model_name_or_path: the HF folder
    result = runner.invoke(app, ["convert", str(folder), "-o", str(tmp_path / "o.gguf"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shapes_validated"] is True


def test_inspect_peft_and_gguf(llama_base, tmp_path):
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=8, lora_alpha=16, alpha_pattern={"v_proj": 4})
    doc = json.loads(runner.invoke(app, ["inspect", str(folder), "--json", "--base", str(llama_base[1])]).stdout)
    scales = {p["module"].split(".")[-1]: p["scale"] for p in doc["pairs"]}
    assert scales["v_proj"] == 0.5 and scales["q_proj"] == 2.0 and doc["fits"] is True
    out = tmp_path / "a.gguf"
    assert runner.invoke(app, ["convert", str(folder), "--base", str(llama_base[1]), "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["inspect", str(out), "--base", str(llama_base[1])])
    assert result.exit_code == 0 and result.stdout.rstrip().endswith("yes")
    assert "pair blk.0.attn_q.weight" in result.stdout


def test_inspect_reports_misfit_with_exit_1(llama_base, tmp_path):
    hf = tmp_path / "wide"
    tiny.make_base("llama", hf, hidden_size=96, intermediate_size=160)
    folder = tiny.make_adapter(hf, tmp_path / "a", r=4)
    result = runner.invoke(app, ["inspect", str(folder), "--base", str(llama_base[1])])
    assert result.exit_code == 1
    assert "fits" in result.stdout and "no: " in result.stdout


def test_alora_invocation_tokens_are_written(llama_base, tmp_path):
    """llama.cpp reads adapter.alora.invocation_tokens (uint32 array) to activate an aLoRA after them."""
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=4)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alora_invocation_tokens"] = [5, 17, 42]
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "a.gguf"
    assert runner.invoke(app, ["convert", str(folder), "--base", str(llama_base[1]), "-o", str(out)]).exit_code == 0
    field = gguf.GGUFReader(out).fields["adapter.alora.invocation_tokens"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert field.contents() == [5, 17, 42]
