"""Mixture-of-experts variants of the 2026 families: parity through the pinned llama-server against
transformers + peft (float32), in convert and merge.

Per family a pico model (tests/families.py: 4 experts, top-2, hidden 64, expert ffn 48, 2 layers) whose base
GGUF llama.cpp's own convert_hf_to_gguf.py writes; one PEFT adapter on attention, the router and the experts
(target_parameters: PEFT's ParamWrapper over transformers 5's 3-D expert parameters), converted by gguf-lora
and served by one llama-server next to deliberately wrong files, which the same comparison must reject (WRONG:
gate/up split interleaved instead of in halves and lora_b read expert-major, tests/test_moe.py write_wrong; for
gemma4 the per-expert scale not folded); one f32 merge served alone; the same file from the HF folder as base.
Tolerance as tests/test_parity.py.

- qwen3vlmoe (Qwen3-VL-30B-A3B's text part): the released checkpoints store the experts transposed against
  transformers' modules, (E, hidden, 2 x ffn) / (E, ffn, hidden), and llama.cpp's converter transposes them
  back (conversion/qwen3vl.py); PEFT adapts the module's own (E, 2 x ffn, hidden), so the adapter's layout is
  qwen3moe's. The pico model is saved in the released layout (families.HUB_TRANSPOSED), so the converter runs
  as on a downloaded checkpoint.
- qwen35moe (Qwen3.5-35B-A3B): qwen35's linear attention with more value heads than key heads (the converter's
  value-head reorder, tests/test_families.py) plus the experts, the router and the shared expert with its gate.
- gemma4moe (Gemma 4 26B-A4B): a dense MLP and the experts side by side; the base holds gate and up fused
  (ffn_gate_up_exps) and router.per_expert_scale as ffn_down_exps.scale, which llama.cpp multiplies into the
  base product only (build_lora_mm_id), while transformers scales the whole expert output: convert folds it
  into each expert's down lora_b, merge must not (llama.cpp scales the merged weight itself). The negative
  controls are a converted file without the fold and a merge with it. The pico model's final norm is
  sharpened (x10) so that an error shows in its otherwise near-uniform logits, and it sets
  final_logit_softcapping as the released models do (llama.cpp caps at 30 when the GGUF has no value).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch

import families
import tiny
from gguf_lora import convert, merge
from gguf_lora import mapping
from gguf_lora.base import load_base
from llamacpp import Server, assert_same_tensors, hf_to_gguf
from test_moe import write_wrong
from test_parity import PROMPT, TOL, compare

pytestmark = [pytest.mark.llama_cpp, pytest.mark.parity]

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
# family -> (LoraConfig kwargs of the adapter, how its gate_up rows split, converter needs tokenizer.model)
FAMILIES = {
    "qwen3vlmoe": (dict(r=8, lora_alpha=16, target_modules=ATTN,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]),
                   "qwen3moe", True),
    "qwen35moe": (dict(r=8, lora_alpha=16, use_rslora=True, target_modules=[
        *ATTN, "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "gate_proj", "up_proj", "down_proj",
        "shared_expert_gate"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                  "mlp.gate.weight"]), "qwen3moe", True),
    "gemma4moe": (dict(r=8, lora_alpha=16, target_modules=[*ATTN, "gate_proj", "up_proj", "down_proj", "router.proj"],
                       target_parameters=["experts.gate_up_proj", "experts.down_proj"]), None, False),
}
# the deliberately wrong files each family's comparison must reject
WRONG = {"qwen3vlmoe": ("split", "b_order"), "qwen35moe": ("split", "b_order"), "gemma4moe": ("unscaled",)}

# GGUF tensors each family's adapter must land on besides the experts and the router
STEMS = {"qwen3vlmoe": ("attn_q", "attn_k", "attn_v", "attn_output"),
         "gemma4moe": ("attn_q", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
         "qwen35moe": ("attn_q", "attn_output", "attn_qkv", "attn_gate", "ssm_alpha", "ssm_beta", "ssm_out",
                       "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")}


class Env:
    def __init__(self, family: str, root: Path):
        self.family, self.root, self.hf = family, root, root / "hf"
        lora, self.split_of, spm = FAMILIES[family]
        families.make_base(family, self.hf)
        self.base_gguf = hf_to_gguf(self.hf, root / "base.gguf", spm_vocab=spm,
                                    extra=families.CONVERTER_FLAGS.get(family, ()))
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in gguf.GGUFReader(self.base_gguf).tensors}
        self.n_vocab = shapes["token_embd.weight"][0]
        self.n_expert, self.hidden, self.ffn = shapes["blk.0.ffn_down_exps.weight"]
        self.base = load_base(self.base_gguf)
        self.adapter = tiny.make_adapter(self.hf, root / "adapter", seed=1, load=families.load_model, **lora)
        self.good = convert(self.adapter, self.base_gguf, root / "adapter.gguf", outtype="f32")
        files, self.ids = [self.good.output], {"adapter": 0}
        for how in WRONG[family]:
            self.ids[f"wrong_{how}"] = len(files)
            out = root / f"wrong_{how}.gguf"
            if how == "unscaled":  # the per-expert scale llama.cpp applies to the base product only, not folded
                with mock.patch.object(mapping, "runtime_scale", lambda name, base: None):
                    files.append(convert(self.adapter, self.base_gguf, out, outtype="f32").output)
            else:
                files.append(write_wrong(self.good.output, self.adapter, out, self.split_of, how, self.n_expert,
                                         self.ffn, self.hidden))
        self.server = Server(self.base_gguf, files, root / "server.log")
        self.models: dict[bool, torch.nn.Module] = {}

    def llama(self, name: str):
        return self.server.complete(PROMPT, {i: float(n == name) for n, i in self.ids.items()})

    def reference(self, steps, adapter: bool = True) -> torch.Tensor:
        """PyTorch's log-probabilities (PEFT loading the adapter folder, or the bare base) on llama.cpp's tokens."""
        if adapter not in self.models:
            self.models[adapter] = (families.load_peft(self.hf, self.adapter) if adapter
                                    else families.load_model(self.hf))
        ids = PROMPT + [s["id"] for s in steps]
        with torch.no_grad():
            logits = self.models[adapter](torch.tensor([ids])).logits[0].double()[:, :self.n_vocab]
        return torch.log_softmax(logits, -1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(steps)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def env(request, tmp_path_factory):
    e = Env(request.param, tmp_path_factory.mktemp(request.param))
    yield e
    e.server.stop()


def _check(env, steps) -> float:
    ref = env.reference(steps)
    worst = compare(steps, ref, TOL)
    assert (ref - env.reference(steps, adapter=False)).abs().max().item() > 20 * TOL  # the adapter acts
    return worst


def test_converted_adapter_matches_peft(env, record_property):
    lora = {t.name for t in gguf.GGUFReader(env.good.output).tensors}
    experts = ("ffn_gate_up_exps",) if env.family == "gemma4moe" else ("ffn_gate_exps", "ffn_up_exps")
    stems = STEMS[env.family] + experts + ("ffn_down_exps", "ffn_gate_inp")
    for stem in stems:
        assert any(n.endswith(f".{stem}.weight.lora_a") for n in lora), stem
    record_property("max_dlogprob", _check(env, env.llama("adapter")))


def _caught(steps, ref) -> float:
    """A deliberately wrong file or merge: the comparison rejects it, by far."""
    with pytest.raises(AssertionError):
        compare(steps, ref, TOL)
    worst = max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, s in enumerate(steps) for t in s["top_logprobs"])
    assert worst > 10 * TOL
    return worst


def test_wrong_expert_layout_fails_the_comparison(env, record_property):
    """Every wrong file of the family (WRONG), served next to the right one, fails the comparison."""
    worst = {}
    for how in WRONG[env.family]:
        steps = env.llama(f"wrong_{how}")
        worst[how] = _caught(steps, env.reference(steps))
    record_property("wrong_dlogprob", min(worst.values()))


def _served(model: Path, log: Path):
    server = Server(model, [], log)
    try:
        return server.complete(PROMPT, {})
    finally:
        server.stop()


def test_merged_experts_match_peft(env, tmp_path, record_property):
    """W_e += s * B_e A_e per expert into an f32 base, served alone; the PEFT folder and its GGUF LoRA merge
    to the same weights (gemma4: the GGUF LoRA's down lora_b carries the per-expert scale, which merge takes
    out again, since llama.cpp scales the merged weight itself)."""
    merged = merge(env.base_gguf, [(env.adapter, 1.0)], tmp_path / "m.gguf", "f32")
    record_property("max_dlogprob", _check(env, _served(Path(merged.output), tmp_path / "server.log")))
    via_gguf = merge(env.base_gguf, [(env.good.output, 1.0)], tmp_path / "g.gguf", "f32")
    if env.family != "gemma4moe":
        assert_same_tensors(via_gguf.output, merged.output)
        return
    ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(merged.output).tensors}
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(via_gguf.output).tensors}
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():  # (s B) A / s: equal up to float32 rounding
        np.testing.assert_allclose(theirs[name], w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_merge_does_not_apply_the_per_expert_scale_twice(env, tmp_path, record_property):
    """gemma4: merging with the per-expert scale folded into the down experts' delta, as for a runtime LoRA,
    scales it twice (llama.cpp scales the merged weight); the comparison must reject that merge."""
    if "unscaled" not in WRONG[env.family]:
        assert env.base_gguf and mapping.runtime_scale("blk.0.ffn_down_exps.weight", env.base) is None
        return
    merge_module = importlib.import_module("gguf_lora.merge")  # the package exports merge() under that name
    twice = lambda adapter, p, base: mapping.pair_arrays(adapter, p, base, runtime=True)  # noqa: E731
    with mock.patch.object(merge_module, "pair_arrays", twice):
        merged = merge(env.base_gguf, [(env.adapter, 1.0)], tmp_path / "twice.gguf", "f32")
    steps = _served(Path(merged.output), tmp_path / "server.log")
    record_property("wrong_dlogprob", _caught(steps, env.reference(steps)))


def test_hf_folder_base_gives_the_same_file(env, tmp_path):
    """With the HF folder as base, the expert shapes come from its config (text_config of a multimodal one)."""
    ours = convert(env.adapter, env.hf, tmp_path / "hf.gguf", outtype="f32")
    assert ours.shapes_validated
    assert_same_tensors(ours.output, env.good.output)


def test_llama_cpp_caps_gemma4_logits_without_a_softcap_value(tmp_path, record_property):
    """Why the gemma4 pico model sets final_logit_softcapping = 30: with null (transformers: no cap) the
    converter writes no gemma4.final_logit_softcapping and llama.cpp's loader keeps its default of 30
    (src/llama-hparams.h), so the bare base already differs from transformers once logits are not
    near-uniform. When this starts to pass within TOL, llama.cpp (or its converter) has fixed it."""
    import transformers

    model, tokenizer = families._gemma4moe(transformers)
    config = model.config
    config.final_logit_softcapping = None
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(config).float().eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    for name, data in families._tokenizer_files(tokenizer).items():
        (hf / name).write_bytes(data)
    base = hf_to_gguf(hf, tmp_path / "base.gguf")
    assert "gemma4.final_logit_softcapping" not in gguf.GGUFReader(base).fields
    steps = _served(base, tmp_path / "server.log")
    ids = PROMPT + [s["id"] for s in steps]
    with torch.no_grad():
        logits = families.load_model(hf)(torch.tensor([ids])).logits[0].double()[:, :tiny.VOCAB]
    ref = torch.log_softmax(logits, -1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(steps)]
    worst = max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, s in enumerate(steps) for t in s["top_logprobs"])
    record_property("max_dlogprob", worst)
    assert worst > TOL
    capped = torch.log_softmax(30 * torch.tanh(logits / 30), -1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(steps)]
    compare(steps, capped, TOL)  # and it is exactly the cap: transformers' logits capped at 30 agree
