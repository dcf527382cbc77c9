"""Each transform and scale rule pinned against an independent reference: PEFT's own code and math, and
llama.cpp's own HF->GGUF converter for the tensor layout (q/k permutation, embedding pair)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from peft.utils.other import get_pattern_key as peft_get_pattern_key

import tiny
from gguf_lora import convert
from gguf_lora.peft import get_pattern_key, load_adapter
from llamacpp import hf_to_gguf


@pytest.mark.parametrize("patterns,key", [
    (["q_proj"], "model.layers.0.self_attn.q_proj"),
    (["layers.1.mlp.up_proj", "up_proj"], "model.layers.1.mlp.up_proj"),
    (["layers.1.mlp.up_proj", "up_proj"], "model.layers.11.mlp.up_proj"),
    (["proj"], "model.layers.0.self_attn.q_proj"),
    ([r"layers\.[01]\.self_attn\.v_proj"], "model.layers.1.self_attn.v_proj"),
    (["^model.layers.0.mlp.down_proj"], "model.layers.0.mlp.down_proj"),
    (["v_proj", "k_proj"], "model.layers.0.self_attn.k_proj"),
])
def test_pattern_key_is_peft_rule(patterns, key):
    assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key)


LORA_CASES = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 12},
                     alpha_pattern={"v_proj": 3, "up_proj": 40}),
    "alpha_zero_pattern": dict(r=4, lora_alpha=0, alpha_pattern={"o_proj": 8}),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_scales_are_peft_scales(llama_base, tmp_path, case):
    """Our per-module scale equals the `scaling` PEFT's own layers compute when loading the adapter."""
    folder = tiny.make_adapter(llama_base[0], tmp_path / case, **LORA_CASES[case])
    ours = {p.module: p.scale for p in load_adapter(folder).pairs.values()}
    model = tiny.load_peft_model(llama_base[0], folder)
    theirs = {name.removeprefix("base_model.model."): m.scaling["default"]
              for name, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert ours.keys() == theirs.keys()
    for module, scale in theirs.items():
        assert ours[module] == pytest.approx(scale, rel=1e-12), module


@pytest.mark.parametrize("case,targets", [
    ("rslora", "all-linear"),
    ("patterns", "all-linear"),
    ("plain", ["embed_tokens", "lm_head", "q_proj", "k_proj"]),
])
def test_runtime_product_equals_merged_model_converted_by_llama_cpp(llama_base, tmp_path, case, targets):
    """W_gguf(merged by PEFT, converted by llama.cpp) == W_gguf(base) + alpha/rank * B_ours @ A_ours.

    PEFT merges the adapter into the weights; llama.cpp's convert_hf_to_gguf.py then lays out the merged
    model (q/k row permutation included). llama.cpp's runtime adds alpha/rank * lora_b @ lora_a of our file
    (for token_embd: (lora_b @ lora_aᵀ)ᵀ). Both must agree for every tensor, so every rule is pinned here:
    scale folding, permutation with GQA, the embedding layout, lm_head.
    """
    hf, base_gguf = llama_base
    folder = tiny.make_adapter(hf, tmp_path / "adapter", target_modules=targets, **LORA_CASES[case])
    merged = tiny.load_peft_model(hf, folder).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "tokenizer.model").write_bytes((hf / "tokenizer.model").read_bytes())
    (tmp_path / "merged" / "tokenizer_config.json").write_text((hf / "tokenizer_config.json").read_text())
    merged_gguf = hf_to_gguf(tmp_path / "merged", tmp_path / "merged.gguf")
    ours = convert(folder, base_gguf, tmp_path / "ours.gguf", outtype="f32")

    tensors = lambda p: {t.name: np.array(t.data) for t in gguf.GGUFReader(p).tensors}  # noqa: E731
    base, want, lora = tensors(base_gguf), tensors(merged_gguf), tensors(ours.output)
    alpha = float(gguf.GGUFReader(ours.output).fields["adapter.lora.alpha"].contents())
    checked = 0
    for name in base:
        if name + ".lora_a" not in lora:
            np.testing.assert_array_equal(want[name], base[name], err_msg=name)
            continue
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        rank = b.shape[1]
        delta = (b @ a.T).T if name == "token_embd.weight" else b @ a
        np.testing.assert_allclose(base[name] + alpha / rank * delta, want[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        checked += 1
    assert checked == len(lora) // 2 > 0


def test_bf16_and_f16_adapters_are_read_exactly(llama_base, tmp_path):
    from safetensors.torch import load_file

    for dtype in (torch.bfloat16, torch.float16):
        folder = tiny.make_adapter(llama_base[0], tmp_path / str(dtype), dtype=dtype)
        adapter = load_adapter(folder)
        reference = load_file(folder / "adapter_model.safetensors")
        for pair in adapter.pairs.values():
            np.testing.assert_array_equal(adapter.read(pair.a_key), reference[pair.a_key].float().numpy())


def test_q8_0_falls_back_per_tensor(llama_base, tmp_path):
    folder = tiny.make_adapter(llama_base[0], tmp_path / "a", r=16, lora_alpha=16)
    out = convert(folder, llama_base[1], tmp_path / "a.gguf", outtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out.output).tensors}
    assert {types[n] for n in types if n.endswith(".lora_a")} == {"Q8_0"}  # rows of 64 or 128
    assert {types[n] for n in types if n.endswith(".lora_b")} == {"F16"}  # rows of 16: not a multiple of 32



def test_trim_vocab_cuts_embedding_lora_to_the_base_rows(tmp_path):
    """gemma3's converter drops out-of-vocabulary rows of token_embd (conversion/gemma.py); the embedding
    LoRA's lora_a (vocab, r) is cut the same way, and an HF-config-only base (rows unknown) is refused."""
    from gguf_lora.archs import archs
    from gguf_lora.base import BaseModel
    from gguf_lora.mapping import pair_arrays, plan
    from gguf_lora.errors import InputError
    from safetensors.numpy import save_file

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 140)).astype(np.float32), rng.normal(size=(64, 4)).astype(np.float32)
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": a,
               "base_model.model.model.embed_tokens.lora_embedding_B": b}, folder / "adapter_model.safetensors")
    adapter = load_adapter(folder)
    base = BaseModel(tmp_path / "b.gguf", "gguf", archs()["gemma3"], 2, 4, 2,
                     {"token_embd.weight": (128, 64), "output.weight": (128, 64)}, False)
    _, planned = plan(adapter, base)
    lora_a, lora_b = pair_arrays(adapter, planned[0], base)
    np.testing.assert_array_equal(lora_a, a.T[:128])
    np.testing.assert_array_equal(lora_b, b)
    base.tensors = None
    with pytest.raises(InputError, match="known only from the base GGUF"):
        plan(adapter, base)
