"""Mixture-of-experts variants of the 2026 families: parity through the pinned llama-server against
transformers + peft (float32), in convert and merge.

Per family a pico model (tests/families.py: 4 experts, top-2, hidden 64, expert ffn 48, 2 layers) whose base
GGUF llama.cpp's own convert_hf_to_gguf.py writes; one PEFT adapter on attention, the router and the experts
(target_parameters: PEFT's ParamWrapper over transformers 5's 3-D expert parameters), converted by gguf-lora
and served by one llama-server next to two deliberately wrong files, which the same comparison must reject:
gate/up split interleaved instead of in halves, and lora_b read expert-major (tests/test_moe.py write_wrong);
and one f32 merge served alone. Tolerance as tests/test_parity.py.

- qwen3vlmoe (Qwen3-VL-30B-A3B's text part): the released checkpoints store the experts transposed against
  transformers' modules, (E, hidden, 2 x ffn) / (E, ffn, hidden), and llama.cpp's converter transposes them
  back (conversion/qwen3vl.py); PEFT adapts the module's own (E, 2 x ffn, hidden), so the adapter's layout is
  qwen3moe's. The pico model is saved in the released layout (families.HUB_TRANSPOSED), so the converter runs
  as on a downloaded checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

import families
import tiny
from gguf_lora import convert, merge
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
}

# GGUF tensors each family's adapter must land on besides the experts and the router
STEMS = {"qwen3vlmoe": ("attn_q", "attn_k", "attn_v", "attn_output"),
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
        self.adapter = tiny.make_adapter(self.hf, root / "adapter", seed=1, load=families.load_model, **lora)
        self.good = convert(self.adapter, self.base_gguf, root / "adapter.gguf", outtype="f32")
        files = [self.good.output]
        for how in ("split", "b_order"):
            files.append(write_wrong(self.good.output, self.adapter, root / f"wrong_{how}.gguf", self.split_of, how,
                                     self.n_expert, self.ffn, self.hidden))
        self.ids = {"adapter": 0, "wrong_split": 1, "wrong_b_order": 2}
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
    stems = STEMS.get(env.family, ()) + ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_inp")
    for stem in stems:
        assert any(n.endswith(f".{stem}.weight.lora_a") for n in lora), stem
    record_property("max_dlogprob", _check(env, env.llama("adapter")))


@pytest.mark.parametrize("how", ["split", "b_order"])
def test_wrong_expert_layout_fails_the_comparison(env, how, record_property):
    steps = env.llama(f"wrong_{how}")
    ref = env.reference(steps)
    with pytest.raises(AssertionError):
        compare(steps, ref, TOL)
    worst = max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, s in enumerate(steps) for t in s["top_logprobs"])
    record_property("wrong_dlogprob", worst)
    assert worst > 10 * TOL


def test_merged_experts_match_peft(env, tmp_path, record_property):
    """W_e += s * B_e A_e per expert into an f32 base, served alone; the PEFT folder and its GGUF LoRA merge
    to the same bytes."""
    merged = merge(env.base_gguf, [(env.adapter, 1.0)], tmp_path / "m.gguf", "f32")
    server = Server(Path(merged.output), [], tmp_path / "server.log")
    try:
        steps = server.complete(PROMPT, {})
    finally:
        server.stop()
    record_property("max_dlogprob", _check(env, steps))
    via_gguf = merge(env.base_gguf, [(env.good.output, 1.0)], tmp_path / "g.gguf", "f32")
    assert_same_tensors(via_gguf.output, merged.output)


def test_hf_folder_base_gives_the_same_file(env, tmp_path):
    """With the HF folder as base, the expert shapes come from its config (text_config of a multimodal one)."""
    ours = convert(env.adapter, env.hf, tmp_path / "hf.gguf", outtype="f32")
    assert ours.shapes_validated
    assert_same_tensors(ours.output, env.good.output)
