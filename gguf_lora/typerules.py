"""Which type llama-quantize gives each tensor (src/llama-quant.cpp, no imatrix, no overrides), for the
output types gguf-lora writes. Tensors it does not quantize keep their input type."""
from __future__ import annotations

import gguf

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# --outtype -> (general.file_type, the ftype's default tensor type)
OUTTYPES: dict[str, tuple[FT, Q]] = {
    "f32": (FT.ALL_F32, Q.F32), "f16": (FT.MOSTLY_F16, Q.F16), "bf16": (FT.MOSTLY_BF16, Q.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0), "q4_0": (FT.MOSTLY_Q4_0, Q.Q4_0), "q4_1": (FT.MOSTLY_Q4_1, Q.Q4_1),
    "q5_0": (FT.MOSTLY_Q5_0, Q.Q5_0), "q5_1": (FT.MOSTLY_Q5_1, Q.Q5_1),
}

# tensor_allows_quantization: substrings and exact names llama-quantize leaves alone
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 (in ggml's order) do not count."""
    ne = list(reversed(shape))
    return max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return (n_dims(shape) >= 2 and name.endswith("weight") and name not in _KEEP_NAMES
            and not any(s in name for s in _KEEP_SUBSTRINGS))


def _fallback(qtype: Q, ncols: int) -> Q:
    """tensor_type_fallback: rows that the block size does not divide."""
    if ncols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    demoted = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0}.get(qtype, qtype)
    return demoted if ncols % gguf.GGML_QUANT_SIZES[demoted][0] == 0 else Q.F16


def target_type(name: str, shape: tuple[int, ...], input_type: Q, outtype: str, has_output: bool) -> Q:
    """llama_tensor_get_type for a dense (non-MoE) model and the legacy / float ftypes."""
    if not allows_quantization(name, shape):
        return input_type
    default = OUTTYPES[outtype][1]
    if default in (Q.F32, Q.F16, Q.BF16):
        return default
    new = default
    ncols = shape[-1]
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if ncols % gguf.GGML_QUANT_SIZES[default][0] != 0:
            new = Q.Q8_0
        elif new != Q.Q8_0:
            new = Q.Q6_K
    return _fallback(new, ncols)
