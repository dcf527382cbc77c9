"""`gguf-lora verify` against the real pinned llama-server and transformers + peft.

One tiny chat llama (hidden 256, so that Q4_K_M quantizes every matrix as it does on real models), one
adapter, and files made right and deliberately wrong in the ways conversions go wrong in the field:
- lora_b doubled (a scale applied twice): must be "wrong" with a fitted strength of 2;
- one module's pair missing (a dropped target): "wrong", naming exactly that module;
- an rsLoRA adapter scaled by alpha/r instead of alpha/sqrt(r): "wrong", strength 1/sqrt(r), rsLoRA named;
- the adapter merged into a Q4_K_M file: "quantization noise", not "wrong" — its error is measured against
  the floor of the same base quantized to Q4_K_M (by llama-quantize);
- the doubled adapter merged into Q4_K_M: still "wrong" (quantization does not hide a bug).
The wrong files are made by editing the PEFT folder and converting it with gguf-lora (whose conversion
parity tests/test_parity.py proves), so each file is wrong in exactly one known way.

The tiny model's weights are drawn at the usual initializer range (0.02) and its final norm scaled by 8 so
that its next-token distributions are as peaked as a trained model's (logit spread ~2.6): Q8_0 then costs
~0.04 and Q4_K_M ~0.4 in mean |Δ log-prob|, the order llama.cpp reports for real models, rather than the
near-uniform distributions (where everything matches) or the chaotic ones (where nothing does) of other
random scales.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tiny
from gguf_lora import convert, merge
from gguf_lora.cli import app
from gguf_lora.errors import InputError, MissingDependencyError, ServerError
from gguf_lora.verify import DEFAULT_PROMPTS, _align, read_prompts, verify
from llamacpp import hf_to_gguf

pytestmark = [pytest.mark.llama_cpp, pytest.mark.parity]

PROMPTS = [{"messages": [{"role": "user", "content": p}]} for p in DEFAULT_PROMPTS[:2]]
TOKENS = 12
DROPPED = "model.layers.1.self_attn.v_proj"
runner = CliRunner()


def _variant(src, dst, config=None, tensors=None):
    """A copy of a PEFT folder with its config and/or tensors edited."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    hf = root / "hf"
    tiny.make_chat_base("llama", hf, hidden_size=256, intermediate_size=512, initializer_range=0.02)
    model = tiny.load_base_model(hf)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(hf)
    base = hf_to_gguf(hf, root / "base.gguf")
    adapter = tiny.make_adapter(hf, root / "sql", seed=1, r=8, lora_alpha=3)  # PEFT scale 3/8
    doubled = _variant(adapter, root / "doubled",
                       tensors=lambda sd: {k: v * 2 if "lora_B" in k else v for k, v in sd.items()})
    files = {
        "ok": convert(adapter, base, root / "ok.gguf").output,
        "doubled": convert(doubled, base, root / "doubled.gguf").output,
        "dropped": convert(_variant(adapter, root / "dropped", tensors=lambda sd: {
            k: v for k, v in sd.items() if DROPPED not in k}), base, root / "dropped.gguf").output,
        "q4_k_m": merge(base, [(adapter, 1.0)], root / "merged-q4_k_m.gguf", "q4_k_m").output,
        "q4_k_m_doubled": merge(base, [(doubled, 1.0)], root / "doubled-q4_k_m.gguf", "q4_k_m").output,
    }
    rslora = tiny.make_adapter(hf, root / "rslora", seed=2, r=16, lora_alpha=8, use_rslora=True)
    files["rslora_as_plain"] = convert(_variant(rslora, root / "rslora-plain", config=lambda c: c.update(
        use_rslora=False)), base, root / "rslora-plain.gguf").output
    return dict(root=root, hf=hf, base=base, adapter=adapter, rslora=rslora, files=files)


@pytest.fixture(scope="module")
def report(world, llama_base, tmp_path_factory):
    # a LoRA for another model (hidden 64): llama-server refuses it; the other files are still checked
    other = tiny.make_adapter(llama_base[0], tmp_path_factory.mktemp("other") / "other", r=4)
    world["files"]["other_model"] = convert(other, llama_base[1], other.parent / "other.gguf").output
    names = ["ok", "doubled", "other_model", "dropped", "q4_k_m", "q4_k_m_doubled"]
    rep = verify(world["adapter"], world["base"], [world["files"][n] for n in names], prompts=PROMPTS,
                 tokens=TOKENS)
    return rep, dict(zip(names, rep.files))


def test_a_file_llama_server_refuses_is_wrong(report):
    other = report[1]["other_model"]
    assert other.verdict == "wrong" and other.error is None
    assert other.cause.startswith("llama-server refused it")


def test_correct_file_matches_and_the_floor_is_the_base(report):
    rep, files = report
    assert rep.floor.max_dlogprob < 1e-4 and rep.floor.greedy_agree == rep.floor.steps  # f32 base: order only
    ok = files["ok"]
    assert ok.verdict == "matches" and ok.ok, ok.cause
    assert ok.error.max_dlogprob < 1e-2 and ok.error.greedy_agree == ok.error.steps  # f16 rounding of A, B
    # the check has teeth: the adapter moves the model far more than the file's error
    assert ok.effect.mean_dlogprob > 0.5 and ok.ratio_effect < 1e-3
    assert rep.kl_exact and rep.n_probs == rep.vocab == 384 and not rep.ok


def test_scale_error_is_wrong_with_its_factor(report):
    doubled = report[1]["doubled"]
    assert doubled.verdict == "wrong"
    assert doubled.scale_factor == pytest.approx(2.0, rel=0.02)
    assert "2x as strongly" in doubled.cause and "doubled" in doubled.cause


def test_dropped_module_is_wrong_and_named(report):
    dropped = report[1]["dropped"]
    assert dropped.verdict == "wrong" and dropped.dropped == [DROPPED], dropped.cause
    assert f"no effect from {DROPPED}" in dropped.cause


def test_q4_k_m_merge_is_quantization_noise_not_wrong(report):
    q4 = report[1]["q4_k_m"]
    assert q4.verdict == "quantization noise", q4.cause
    assert q4.lossy and q4.types.get("Q4_K", 0) > 0 and q4.precision_floor_of.endswith("quantized to q4_k_m")
    # honest, not tuned: far above the f32 floor, about the Q4_K_M floor (measured 0.8-0.9x), and
    # unexplained by any bug hypothesis (the fitted strength stays at 1)
    assert q4.ratio_floor > 1e3
    assert 0.3 < q4.error.mean_dlogprob / q4.precision_floor.mean_dlogprob < 2.0
    assert q4.scale_factor == pytest.approx(1.0, abs=0.05) and not q4.dropped
    # quantization does not hide a bug: the doubled adapter merged the same way is still wrong
    bad = report[1]["q4_k_m_doubled"]
    assert bad.verdict == "wrong" and bad.scale_factor == pytest.approx(2.0, rel=0.15), bad.cause


def test_template_check(report):
    """The GGUF carries the HF chat template, but llama-server's chat path adds BOS (add_bos_token) where
    transformers' apply_chat_template does not: verify reports it."""
    rep = report[0]
    assert rep.template.same_text is True and rep.template.tokens_same == 0 and rep.template.checked == 2
    assert "llama-server has '<s>'" in rep.template.first_difference
    assert any("chat template" in w for w in rep.warnings)


def test_llama_server_leaves_out_steps_inside_a_utf8_character(world):
    """llama.cpp quirk that verify works around (_align): a generated token that ends inside a UTF-8
    character gets no completion_probabilities entry. Forcing the byte token 0xE2 (a 3-byte lead) twice
    gives two tokens and no probabilities at all."""
    from gguf_lora.runtime.llama_server import ManagedServer

    lead = tiny_token_id(world["hf"], "<0xE2>")
    with ManagedServer(world["base"], extra_args=["-c", "256", "-np", "1"]) as client:
        doc = client.complete([1, 5, 6], n_predict=2, n_probs=3, temperature=0.0, logit_bias=[[lead, 100.0]],
                              return_tokens=True, cache_prompt=False)
    assert doc["tokens"] == [lead, lead] and doc.get("completion_probabilities", []) == []


def tiny_token_id(hf, piece: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf).convert_tokens_to_ids(piece)


def test_cli_rslora_read_as_plain_lora_is_wrong(world, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    result = runner.invoke(app, ["verify", str(world["rslora"]), str(world["files"]["rslora_as_plain"]),
                                 "--base", str(world["base"]), "--prompts", str(prompts), "-n", str(TOKENS),
                                 "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    (f,) = doc["files"]
    assert doc["ok"] is False and f["verdict"] == "wrong" and f["kind"] == "lora"
    assert f["scale_factor"] == pytest.approx(1 / math.sqrt(16), rel=0.02)
    assert "rsLoRA" in f["cause"] and "use_rslora ignored" in f["cause"]


def test_cli_converts_the_adapter_when_no_file_is_given(world, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hello.\n\nCount to three.\n")
    result = runner.invoke(app, ["verify", str(world["adapter"]), "--base", str(world["base"]), "--prompts",
                                 str(prompts), "-n", "8"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("2 chat prompts x 8 greedy tokens")
    assert any(line.startswith("sql (converted, f16)") and line.endswith("matches") for line in lines)
    assert lines[-1] == "1 of 1 files match"


def test_missing_torch_stack_is_one_clear_error(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs peft, which is not installed.*'gguf-lora\[verify\]'"):
        verify(world["adapter"], world["base"])
    result = runner.invoke(app, ["verify", str(world["adapter"]), "--base", str(world["base"])])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: Verify needs peft") and result.stderr.count("\n") == 1


def test_missing_hf_base_is_one_clear_error(world, tmp_path):
    with pytest.raises(InputError, match="(?i)Hugging Face base .*nowhere is not there.*--hf-base"):
        verify(world["adapter"], world["base"], hf_base=tmp_path / "nowhere")
    moved = shutil.copytree(world["adapter"], tmp_path / "a")
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"  # a hub name, not a local folder
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="(?i)no Hugging Face base.*is not a local folder.*--hf-base"):
        verify(moved, world["base"])


def test_torch_is_imported_only_when_verify_runs():
    code = "import sys, gguf_lora.cli, gguf_lora.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_align_replays_llama_servers_utf8_rule():
    """'⪩' is 0xE2 0xA9 0xA9: until its last byte the text ends inside a character, so llama-server records
    no probabilities for those steps. Token 8 (0xA9) comes twice: matching entries to tokens by id alone
    would put the first entry on step 1 instead of step 2."""
    pieces = {5: b"a", 6: b"\xe2", 8: b"\xa9"}
    tokens = [6, 8, 8, 5]
    entries = [{"id": t, "top_logprobs": [{"id": k, "bytes": list(v)} for k, v in pieces.items()]} for t in (8, 5)]
    assert _align(tokens, entries) == [2, 3]
    with pytest.raises(ServerError, match="do not follow"):
        _align([5, 5], [{"id": 9, "top_logprobs": []}])


def test_read_prompts_formats(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("one\n\n two \n")
    assert read_prompts(text) == [{"messages": [{"role": "user", "content": "one"}]},
                                  {"messages": [{"role": "user", "content": "two"}]}]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "raw"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert read_prompts(jl) == [{"prompt": "raw"}, {"messages": [{"role": "user", "content": "hi"}]}]
    jl.write_text('{"text": "x"}\n')
    with pytest.raises(InputError, match="line 1 is neither"):
        read_prompts(jl)
