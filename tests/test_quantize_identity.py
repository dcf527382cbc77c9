"""`gguf-lora quantize` writes the same tensors, types and bytes as llama-quantize (pinned build, no imatrix).

Inputs are tiny models converted by llama.cpp's own convert_hf_to_gguf.py to F32 and F16, with hidden size
256 so that K-quants apply (and the output tensor takes llama-quantize's Q6_K path), and with adversarial rows
planted in the
weights: all-zero blocks, constant rows, huge and tiny magnitudes, float32 subnormals, single spikes.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from gguf_lora import quantize
from llamacpp import assert_same_tensors, hf_to_gguf, llama_quantize

pytestmark = pytest.mark.llama_cpp

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
         "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


def plant_adversarial(model: torch.nn.Module, transposed_experts: bool = False) -> None:
    """Adversarial rows in every matrix, and in every expert's matrix of a 3-D expert parameter (along the
    rows llama.cpp quantizes: the input dimension, the middle one where experts are stored (E, in, out))."""
    with torch.no_grad():
        matrices = []
        for name, p in model.named_parameters():
            if p.dim() == 2:
                matrices.append(p.data)
            elif p.dim() == 3:
                matrices.extend(p.data[e].T if transposed_experts else p.data[e] for e in range(p.shape[0]))
        for i, w in enumerate(m for m in matrices if m.shape[0] >= 8):  # not a 4-expert router
            w[0, :64] = 0  # all-zero blocks
            w[1] = 0.37  # a constant row
            w[2, :32] *= 1e4  # huge block
            w[3, :48] *= 1e-6  # tiny block
            w[4, 32:64] = torch.tensor(1e-41)  # float32 subnormals
            w[5] = 0
            w[5, 7] = -3.0  # one spike in a zero row
            if i % 2:
                w[6, :16] = -w[6, :16].abs()  # a negative-only half block
            w[7, :32] = w[7, :32].clamp(-1, 1)
            w[7, 5] = 7.9999995  # MXFP4: log2f rounds up to 3 here, so the block's exponent is 8's, not 4's


SHAPES = {
    # 10 layers: the K-quant mixes count attn_v / ffn_down in llama-quantize's order (blk.10 after blk.9),
    # and use_more_bits picks different layers than with 2
    "llama": dict(num_hidden_layers=10),
    "gemma": dict(),  # tied: token_embd takes the output tensor's rule
    "phi3": dict(),  # fused attn_qkv counts as attn_v
    "qwen2": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32),  # GQA 4: q2_k's attn_v rule
    "qwen3": dict(),
    "gemma2": dict(),
    "gemma3": dict(),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"quant-{request.param}")
    shape = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, **SHAPES[request.param]}
    model = tiny.make_base(request.param, root / "hf", **shape)
    plant_adversarial(model)
    model.save_pretrained(root / "hf")
    return root, {src: hf_to_gguf(root / "hf", root / f"base-{src}.gguf", src) for src in ("f32", "f16")}


@pytest.mark.parametrize("outtype", TYPES)
@pytest.mark.parametrize("src", ["f32", "f16"])
def test_quantize_is_byte_identical_to_llama_quantize(models, src, outtype):
    root, bases = models
    ours = quantize(bases[src], root / f"ours-{src}-{outtype}.gguf", outtype, force=True)
    theirs = llama_quantize(bases[src], root / f"theirs-{src}-{outtype}.gguf", outtype)
    assert_same_tensors(ours.output, theirs)


# Mixture of experts: 3-D expert tensors, MXFP4 (experts) + Q8_0 (the rest) for mxfp4_moe, and the
# 8-expert rules (attn_v / attn_k to Q8_0, attn_output Q5_K in the K mixes, q3_k_l's exception); gpt-oss
# stores its experts transposed (E, in, out) with hidden = expert ffn.
MOE_SHAPES = {
    "qwen3moe": dict(num_experts=8, moe_intermediate_size=256),
    "gpt-oss": dict(intermediate_size=256),
}
MOE_CASES = {
    "qwen3moe": [("f32", t) for t in ("q8_0", "q2_k", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "mxfp4_moe")]
    + [("f16", "q4_k_m"), ("f16", "mxfp4_moe")],
    "gpt-oss": [("f32", "mxfp4_moe"), ("f32", "q4_k_m"), ("f16", "mxfp4_moe")],
}


@pytest.fixture(scope="module", params=list(MOE_SHAPES))
def moe_models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"quant-{request.param}")
    shape = {"hidden_size": 256, "head_dim": 64, **MOE_SHAPES[request.param]}
    model = tiny.make_base(request.param, root / "hf", **shape)
    plant_adversarial(model, transposed_experts=request.param == "gpt-oss")
    model.save_pretrained(root / "hf")
    f32 = hf_to_gguf(root / "hf", root / "base-f32.gguf", "f32", spm_vocab=True)
    return request.param, root, {"f32": f32, "f16": llama_quantize(f32, root / "base-f16.gguf", "f16")}


@pytest.mark.parametrize("case", range(max(len(c) for c in MOE_CASES.values())))
def test_moe_quantize_is_byte_identical_to_llama_quantize(moe_models, case):
    arch, root, bases = moe_models
    if case >= len(MOE_CASES[arch]):
        return
    src, outtype = MOE_CASES[arch][case]
    ours = quantize(bases[src], root / f"ours-{src}-{outtype}.gguf", outtype, force=True)
    theirs = llama_quantize(bases[src], root / f"theirs-{src}-{outtype}.gguf", outtype)
    assert_same_tensors(ours.output, theirs)
    if outtype == "mxfp4_moe":
        assert ours.types.get("MXFP4") == 6
    if arch == "qwen3moe" and outtype == "q4_k_m":  # 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K
        import gguf

        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours.output).tensors}
        assert [types[f"blk.0.attn_{x}.weight"] for x in ("v", "k", "output")] == ["Q8_0", "Q8_0", "Q5_K"]


@pytest.mark.parametrize("outtype", ["q2_k", "q4_k_m", "q5_k_s", "q6_k"])
def test_numpy_fallback_is_byte_identical_too(models, outtype, monkeypatch):
    """Without numba the vectorised numpy search loops run instead; they must give the same bytes."""
    import gguf_lora.quants as quants

    monkeypatch.setattr(quants, "_JIT", None)
    root, bases = models
    ours = quantize(bases["f16"], root / f"numpy-{outtype}.gguf", outtype, force=True)
    assert_same_tensors(ours.output, llama_quantize(bases["f16"], root / f"theirs-np-{outtype}.gguf", outtype))
