"""Our GGUF LoRA against llama.cpp's own convert_lora_to_gguf.py (pinned tree).

Where its output is right (plain LoRA) ours is the same, tensor by tensor. Where it is wrong (rsLoRA,
alpha_pattern: it writes alpha and lets the runtime divide by the rank), llama-server with its file
disagrees with PyTorch while ours agrees.
"""
from __future__ import annotations

import pytest

import tiny
from gguf_lora import convert
from llamacpp import Server, assert_same_tensors, lora_to_gguf
from test_parity import PROMPT, TOL, compare, torch_logprobs

pytestmark = pytest.mark.llama_cpp


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("targets", ["all-linear", ["embed_tokens", "lm_head", "q_proj", "k_proj"]],
                         ids=["all_linear", "embedding"])
def test_plain_lora_identical_to_llama_cpp_converter(llama_base, tmp_path, outtype, targets):
    hf, base_gguf = llama_base
    folder = tiny.make_adapter(hf, tmp_path / "a", r=8, lora_alpha=16, target_modules=targets)
    if targets != "all-linear":  # llama.cpp's converter refuses PEFT's saved embedding copies
        from safetensors.numpy import load_file, save_file

        st = folder / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(st).items() if "base_layer" not in k}, st)
    assert_same_tensors(convert(folder, base_gguf, tmp_path / "ours.gguf", outtype=outtype).output,
                        lora_to_gguf(folder, hf, tmp_path / "theirs.gguf", outtype))


def test_llama_cpp_converter_gets_rslora_and_alpha_pattern_wrong(llama_base, tmp_path):
    hf, base_gguf = llama_base
    cases = {"rslora": dict(r=16, lora_alpha=8, use_rslora=True),
             "alpha_pattern": dict(r=8, lora_alpha=16, alpha_pattern={"v_proj": 3, "down_proj": 48})}
    files = []
    for name, lora in cases.items():
        folder = tiny.make_adapter(hf, tmp_path / name, **lora)
        files.append(convert(folder, base_gguf, tmp_path / f"{name}-ours.gguf", outtype="f32").output)
        files.append(lora_to_gguf(folder, hf, tmp_path / f"{name}-theirs.gguf", "f32"))
    server = Server(base_gguf, files, tmp_path / "server.log")
    try:
        for i, name in enumerate(cases):
            ref_model = tiny.load_peft_model(hf, tmp_path / name)
            ours = server.complete(PROMPT, {j: float(j == 2 * i) for j in range(len(files))})
            compare(ours, torch_logprobs(ref_model, ours), TOL)
            theirs = server.complete(PROMPT, {j: float(j == 2 * i + 1) for j in range(len(files))})
            ref = torch_logprobs(ref_model, theirs)
            worst = max(abs(top["logprob"] - ref[k, top["id"]].item())
                        for k, step in enumerate(theirs) for top in step["top_logprobs"])
            assert worst > 10 * TOL, f"{name}: llama.cpp's converter now matches PEFT (Δ {worst:.3g})"
    finally:
        server.stop()
