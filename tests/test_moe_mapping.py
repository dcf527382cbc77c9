"""Expert mapping without a server: what a fused gate_up tensor gets, merge's per-slice products, and the
one-line errors (nothing written) for adapters that do not fit. The references are PEFT's own delta
(ParamWrapper.get_delta_weight) and llama.cpp's converter rules (conversion/base.py fuses gate then up)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

import tiny
from gguf_lora.archs import archs
from gguf_lora.base import BaseModel
from gguf_lora.errors import UnsupportedError
from gguf_lora.mapping import pair_arrays, plan
from gguf_lora.merge import Prepared
from gguf_lora.peft import load_adapter
from test_bad_input import run_fails
from test_moe import EXPERTS, make_per_expert_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny qwen3moe HF folder (4 experts, hidden 64, expert ffn 32) and a stacked expert adapter on it."""
    root = tmp_path_factory.mktemp("qwen3moe")
    tiny.make_base("qwen3moe", root / "hf")
    adapter = tiny.make_adapter(root / "hf", root / "fused", r=4, lora_alpha=8, target_modules=None,
                                target_parameters=EXPERTS)
    return root / "hf", adapter


def _fused_base(arch: str, hf, layers=2) -> BaseModel:
    """A base GGUF's shapes where gate and up are one ffn_gate_up_exps (convert_hf_to_gguf --fuse-gate-up-exps)."""
    cfg = json.loads((hf / "config.json").read_text())
    e, h = cfg.get("num_experts") or cfg["num_local_experts"], cfg["hidden_size"]
    i = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    tensors = {}
    for n in range(layers):
        tensors[f"blk.{n}.ffn_gate_up_exps.weight"] = (e, 2 * i, h)
        tensors[f"blk.{n}.ffn_down_exps.weight"] = (e, h, i)
        tensors[f"blk.{n}.ffn_gate_inp.weight"] = (e, h)
    return BaseModel(hf, "gguf", archs()[arch], layers, 4, 2, tensors, False)


def _product(adapter, p, base, alpha):
    a, b = pair_arrays(adapter, p, base)
    return alpha / p.rank * np.einsum("eor,eri->eoi", b, a)


@pytest.mark.parametrize("arch", ["qwen3moe", "gpt-oss"])
def test_fused_gate_up_tensor_gets_gate_then_up(arch, tmp_path):
    """A base holding ffn_gate_up_exps keeps the stacked pair whole (qwen: PEFT's rows are already gate then
    up) or regroups gpt-oss's interleaved rows into llama.cpp's [gate; up] (conversion/base.py cat)."""
    hf = tmp_path / "hf"
    tiny.make_base(arch, hf)
    folder = tiny.make_adapter(hf, tmp_path / "a", r=4, lora_alpha=8, target_modules=None, target_parameters=EXPERTS)
    adapter, base = load_adapter(folder), _fused_base(arch, hf)
    alpha, planned = plan(adapter, base)
    pairs = {p.gguf_name: p for p in planned}
    fused = pairs["blk.0.ffn_gate_up_exps.weight"]
    assert fused.rank == 4 and fused.experts == 4  # one source: A is shared, the rank unchanged
    wrapper = tiny.load_peft_model(hf, folder).base_model.model.model.layers[0].mlp.experts
    inner = wrapper.base_layer if wrapper.parameter_name == "down_proj" else wrapper
    delta = inner.get_delta_weight("default").detach().numpy()  # PEFT: (E, 2I, H), or (E, H, 2I) transposed
    if arch == "gpt-oss":  # gpt_oss.py: transpose, then gate = rows 0::2, up = rows 1::2
        delta = delta.transpose(0, 2, 1)
        delta = np.concatenate([delta[:, 0::2], delta[:, 1::2]], axis=1)
    np.testing.assert_allclose(_product(adapter, fused, base, alpha), delta, rtol=1e-5, atol=1e-6)


def test_per_expert_gate_and_up_fuse_along_the_rank(qwen, tmp_path):
    """transformers 4 per-expert gate_proj / up_proj onto a fused base: A concatenated along the rank, B
    block-diagonal (PEFT's own PeftConcatenate rule), each expert's product s * B_e A_e in its rows."""
    hf, _ = qwen
    folder = make_per_expert_adapter(hf, tmp_path / "v4", "qwen3moe")
    adapter, base = load_adapter(folder), _fused_base("qwen3moe", hf)
    alpha, planned = plan(adapter, base)
    fused = next(p for p in planned if p.gguf_name == "blk.1.ffn_gate_up_exps.weight")
    assert fused.rank == 8  # gate's 4 + up's 4
    raw = load_file(folder / "adapter_model.safetensors")
    want = []
    for e in range(4):
        pre = f"base_model.model.model.layers.1.mlp.experts.{e}."
        want.append(np.concatenate([raw[pre + f"{leaf}.lora_B.weight"] @ raw[pre + f"{leaf}.lora_A.weight"]
                                    for leaf in ("gate_proj", "up_proj")]) * 2.0)  # alpha 8 / r 4
    np.testing.assert_allclose(_product(adapter, fused, base, alpha), np.stack(want), rtol=1e-5, atol=1e-6)


def test_stacked_adapter_is_read_with_its_own_rank(qwen):
    """transformers 5 + peft 0.21 stack the experts: lora_A is (E * r, in). Not 'rank 16 vs 4'."""
    adapter = load_adapter(qwen[1])
    stacked = [p for p in adapter.pairs.values() if p.stacked]
    assert len(stacked) == 4 and {(p.rank, p.experts) for p in stacked} == {(4, 4)}
    assert {frozenset(p.params) for p in stacked} == {frozenset({"gate_up_proj", "down_proj"})}


def test_merge_products_are_formed_per_slice(qwen):
    """merge never holds an adapter's whole delta: a slice of rows costs a slice (across expert borders)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 16)).astype(np.float32), rng.normal(size=(3, 5, 4)).astype(np.float32)
    p = Prepared(a, b)
    full = np.einsum("eor,eri->eoi", b, a).reshape(15, 16)
    for sl in (slice(0, 15), slice(3, 12), slice(4, 5), slice(10, 15)):
        np.testing.assert_allclose(p.delta(sl), full[sl], rtol=1e-5, atol=1e-6)
    emb = Prepared(rng.normal(size=(9, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32), True)
    np.testing.assert_allclose(emb.delta(slice(2, 7)), (emb.a @ emb.b.T)[2:7], rtol=1e-5, atol=1e-6)
    assert not hasattr(p, "full") and set(vars(p)) == {"a", "b", "embedding", "magnitude", "replace", "add"}


def test_expert_count_mismatch_is_refused(qwen, tmp_path):
    """llama.cpp checks only ne[0] and ne[1] of a LoRA pair (an expert count that differs writes out of
    bounds at run time, llama.cpp#29128): gguf-lora checks it."""
    hf8 = tmp_path / "hf8"
    tiny.make_base("qwen3moe", hf8, num_experts=8)
    out = tmp_path / "o.gguf"
    run_fails(["convert", qwen[1], "--base", hf8, "-o", out], "stacks 16 rows", "4 experts of rank 4",
              "8 experts", out=out)


def test_expert_shapes_matching_neither_projection(qwen, tmp_path):
    wide = tmp_path / "wide"
    tiny.make_base("qwen3moe", wide, moe_intermediate_size=48)
    out = tmp_path / "o.gguf"
    run_fails(["convert", qwen[1], "--base", wide, "-o", out], "match neither expert projection", out=out)


def test_rank_differing_between_experts(qwen, tmp_path):
    """llama.cpp stores one rank per expert tensor; a per-expert adapter whose experts differ is refused."""
    folder = make_per_expert_adapter(qwen[0], tmp_path / "v4", "qwen3moe")
    raw = load_file(folder / "adapter_model.safetensors")
    for key in [k for k in raw if ".experts.2.up_proj." in k]:
        raw[key] = raw[key][:2] if "lora_A" in key else raw[key][:, :2]
    save_file(raw, folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"experts.2.up_proj": 2}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    run_fails(["convert", folder, "--base", qwen[0], "-o", out], "ranks [2, 4] across experts", out=out)


def test_expert_beyond_the_base(qwen, tmp_path):
    folder = make_per_expert_adapter(qwen[0], tmp_path / "v4", "qwen3moe")
    raw = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace(".experts.3.", ".experts.7."): v for k, v in raw.items()}, folder / "adapter_model.safetensors")
    out = tmp_path / "o.gguf"
    run_fails(["convert", folder, "--base", qwen[0], "-o", out], "expert 7", "4 experts", out=out)


def test_unknown_expert_layout(qwen):
    """An architecture without expert data in archs.json: its experts are refused, not guessed."""
    adapter = load_adapter(qwen[1])
    base = BaseModel(qwen[0], "gguf", archs()["qwen3"], 2, 4, 2, None, False)
    with pytest.raises(UnsupportedError, match="does not know how qwen3 lays out its experts"):
        plan(adapter, base)


def test_router_lora_maps_as_a_linear(qwen, tmp_path):
    """The router (a 2-D ParamWrapper in transformers 5) lands on ffn_gate_inp like any Linear."""
    folder = tiny.make_adapter(qwen[0], tmp_path / "r", r=4, lora_alpha=8, target_modules=None,
                               target_parameters=["mlp.gate.weight"])
    adapter = load_adapter(folder)
    base = BaseModel(qwen[0], "hf", archs()["qwen3moe"], 2, 4, 2, {f"blk.{n}.ffn_gate_inp.weight": (4, 64)
                                                                   for n in range(2)}, False)
    _, planned = plan(adapter, base)
    assert [(p.gguf_name, p.a_shape, p.b_shape) for p in planned] == [
        (f"blk.{n}.ffn_gate_inp.weight", (4, 64), (4, 4)) for n in range(2)]
    peft = tiny.load_peft_model(qwen[0], folder).base_model.model.model.layers[1].mlp.gate
    a, b = pair_arrays(adapter, planned[1], base)
    np.testing.assert_allclose(peft.get_delta_weight("default").detach().numpy(), 2.0 * b @ a, rtol=1e-5, atol=1e-7)
