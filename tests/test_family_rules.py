"""The families' rules against independent references, without a server: the value-head reorder against
llama.cpp's own converter function, and the vision / audio module rule against transformers' real module trees."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gguf_lora.archs import archs, reorder_v_heads, shared
from gguf_lora.llama_cpp import find_source_file

_REORDER = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion.qwen import _LinearAttentionVReorderBase as base
out = {}
for nk, nv, dim in ((2, 4, 3), (2, 6, 1), (4, 8, 16), (3, 3, 2)):
    n = nv * dim
    rows = base._reorder_v_heads(torch.arange(n, dtype=torch.float64)[:, None].repeat(1, 2), 0, nk, nv // nk, dim)
    cols = base._reorder_v_heads(torch.arange(n, dtype=torch.float64)[None, :].repeat(2, 1), 1, nk, nv // nk, dim)
    out[f"{nk},{nv},{dim}"] = [rows[:, 0].long().tolist(), cols[0].long().tolist()]
print(json.dumps(out))
"""


@pytest.mark.llama_cpp
def test_value_head_reorder_is_llama_cpps():
    """conversion/qwen.py _reorder_v_heads, run on row and column indices in the pinned tree's own Python."""
    src = find_source_file("convert_hf_to_gguf.py").parent
    proc = subprocess.run([sys.executable, "-c", _REORDER, str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key, (rows, cols) in json.loads(proc.stdout).items():
        nk, nv, dim = map(int, key.split(","))
        ours = reorder_v_heads(nv * dim, nk, nv, dim).tolist()
        assert ours == rows == cols, key
    assert not np.array_equal(reorder_v_heads(8, 2, 4, 2), np.arange(8))  # a real reorder, not the identity


def _linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("family", ["gemma4", "qwen35", "mistral3", "qwen2_5_vl", "qwen3_vl"])
def test_non_text_rule_splits_real_module_trees(family):
    """Every Linear of transformers' multimodal classes (built on the meta device at their default sizes) is
    either in the language model (or lm_head), which gguf-lora maps, or in a tower the rule refuses."""
    import transformers as T

    configs = {
        "gemma4": lambda: T.Gemma4Config(text_config=T.Gemma4TextConfig(num_hidden_layers=2),
                                         vision_config=T.Gemma4VisionConfig(), audio_config=T.Gemma4AudioConfig()),
        "qwen35": lambda: T.Qwen3_5Config(text_config=T.Qwen3_5TextConfig(num_hidden_layers=4)),
        "mistral3": lambda: T.Mistral3Config(text_config=T.MistralConfig(num_hidden_layers=2)),
        "qwen2_5_vl": lambda: T.Qwen2_5_VLConfig(text_config=T.Qwen2_5_VLTextConfig(num_hidden_layers=2)),
        "qwen3_vl": lambda: T.Qwen3VLConfig(text_config=T.Qwen3VLTextConfig(num_hidden_layers=2)),
    }
    classes = {"gemma4": T.Gemma4ForConditionalGeneration, "qwen35": T.Qwen3_5ForConditionalGeneration,
               "mistral3": T.Mistral3ForConditionalGeneration, "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
               "qwen3_vl": T.Qwen3VLForConditionalGeneration}
    with torch.device("meta"):
        model = classes[family](configs[family]())
    names = _linears(model)
    towers = [n for n in names if shared().non_text(n)]
    text = [n for n in names if not shared().non_text(n)]
    assert towers and text
    assert all(n == "lm_head" or n.startswith("model.language_model.") for n in text), text[:3]
    arch = next(a for a in archs().values() if a.accepts(type(model).__name__))
    names = arch.name_map(64)
    unmapped = [n for n in text if names.get_name(arch.normalize_module(n) + ".weight", try_suffixes=(".weight",)) is None]
    assert not unmapped, unmapped[:3]


def test_archs_json_sections_and_transform_lookup():
    a = archs()
    assert "_shared" not in a and {"qwen35", "gemma4", "mistral3", "qwen2vl", "qwen3vl", "smollm3", "granite",
                                   "olmo2", "glm4", "lfm2"} <= set(a)
    q = a["qwen35"]
    assert q.transforms_for("model.norm") == ("norm_plus_one",)
    assert q.transforms_for("model.layers.0.linear_attn.norm") == ()  # the gated norm is stored as is
    assert q.transforms_for("model.layers.0.linear_attn.out_proj") == ("v_heads_cols",)
    assert a["llama"].accepts("Mistral3ForConditionalGeneration") and a["mistral3"].accepts("Ministral3ForCausalLM")
    assert shared().fused_blocks["attn_qkv"] == ("attn_q", "attn_k", "attn_v")
    for prefix in ("model.language_model.", "language_model.model."):
        assert a["mistral3"].normalize_module(prefix + "layers.2.mlp.up_proj") == "model.layers.2.mlp.up_proj"
    assert a["gemma3"].normalize_module("language_model.lm_head") == "lm_head"
