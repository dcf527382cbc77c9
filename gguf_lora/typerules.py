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
    "q2_k": (FT.MOSTLY_Q2_K, Q.Q2_K), "q3_k_s": (FT.MOSTLY_Q3_K_S, Q.Q3_K), "q3_k_m": (FT.MOSTLY_Q3_K_M, Q.Q3_K),
    "q3_k_l": (FT.MOSTLY_Q3_K_L, Q.Q3_K), "q4_k_s": (FT.MOSTLY_Q4_K_S, Q.Q4_K), "q4_k_m": (FT.MOSTLY_Q4_K_M, Q.Q4_K),
    "q5_k_s": (FT.MOSTLY_Q5_K_S, Q.Q5_K), "q5_k_m": (FT.MOSTLY_Q5_K_M, Q.Q5_K), "q6_k": (FT.MOSTLY_Q6_K, Q.Q6_K),
    "mxfp4_moe": (FT.MOSTLY_MXFP4_MOE, Q.MXFP4),  # expert tensors MXFP4, the rest Q8_0 (gpt-oss's own layout)
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


def _layer(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() else -1


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_types(tensors: list[tuple[str, tuple[int, ...], Q]], outtype: str, n_layers: int,
               model_70b: bool = False, n_gqa: int = 1, n_expert: int = 0,
               fallbacks: list[tuple[str, Q, Q]] | None = None) -> dict[str, Q]:
    """llama_tensor_get_type for every tensor (no imatrix, no overrides).

    fallbacks, when given, receives (name, planned type, type written) for each tensor whose rows the planned
    type cannot hold: the tensors llama-quantize counts in "N of M tensor(s) required fallback quantization".

    llama-quantize walks tensors by layer number, then name (weight_name_comparer); the attn_v and
    ffn_down counters of the K-quant mixes follow that order, so this does too. With experts
    (n_expert > 1) the ffn_down rules take the layer from the tensor's name instead of the counter, and
    8-expert models get their own attn_v / attn_k / attn_output rules (the Mixtral-8x7B tuning)."""
    default = OUTTYPES[outtype][1]
    has_output = any(name == "output.weight" for name, _, _ in tensors)
    ordered = sorted(tensors, key=lambda t: (_layer(t[0]), t[0]))
    n_attn_v = sum(1 for name, _, _ in tensors if "attn_v.weight" in name or "attn_qkv.weight" in name)
    i_attn_v = i_ffn_down = 0
    out: dict[str, Q] = {}
    for name, shape, input_type in ordered:
        if not allows_quantization(name, shape):
            out[name] = input_type
            continue
        if default in (Q.F32, Q.F16, Q.BF16):
            out[name] = default
            continue
        new = default
        ncols = shape[-1]
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            if outtype == "mxfp4_moe":
                new = Q.Q8_0
            elif ncols % gguf.GGML_QUANT_SIZES[default][0] != 0:
                new = Q.Q8_0
            elif new != Q.Q8_0:
                new = Q.Q6_K
        elif outtype == "mxfp4_moe":  # experts (ne[2] > 1) MXFP4, everything else Q8_0
            new = Q.MXFP4 if len(shape) == 3 and shape[0] > 1 else Q.Q8_0
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name or "attn_qkv.weight" in name:  # category_is_attn_v
            if outtype == "q2_k":
                new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
            elif outtype == "q3_k_m":
                new = Q.Q5_K if i_attn_v < 2 else Q.Q4_K
            elif outtype == "q3_k_l":
                new = Q.Q5_K
            elif outtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
                new = Q.Q6_K
            elif outtype == "q4_k_s" and i_attn_v < 4:
                new = Q.Q5_K
            if model_70b and new in (Q.Q3_K, Q.Q4_K):
                new = Q.Q5_K
            if n_expert == 8:
                new = Q.Q8_0
            i_attn_v += 1
        elif "attn_k.weight" in name:
            if n_expert == 8:
                new = Q.Q8_0
        elif "attn_q.weight" in name:
            pass
        elif "attn_output.weight" in name:
            if n_expert == 8:
                if outtype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                    new = Q.Q5_K
            else:
                new = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(outtype, new)
        elif "ffn_up" in name or "ffn_gate" in name:
            pass  # only the IQ mixes change these
        elif "ffn_down" in name:
            i_layer = _layer(name) if n_expert > 1 else i_ffn_down
            if outtype == "q2_k":
                new = Q.Q3_K
            elif outtype == "q3_k_m":
                new = Q.Q5_K if i_layer < n_layers // 16 else Q.Q4_K
            elif outtype == "q3_k_l":
                new = Q.Q5_K
            elif outtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i_layer, n_layers):
                new = Q.Q6_K
            elif outtype == "q4_k_s" and i_layer < n_layers // 8:
                new = Q.Q5_K
            i_ffn_down += 1
        out[name] = _fallback(new, ncols)
        if fallbacks is not None and out[name] != new:
            fallbacks.append((name, new, out[name]))
    return out


def is_70b(arch: str, n_layers: int, n_head: int, n_head_kv: int) -> bool:
    """LLM_TYPE_70B as llama.cpp's loader decides it for the architectures we support."""
    return n_layers == 80 and (arch == "qwen2" or (arch == "llama" and n_head != n_head_kv))
