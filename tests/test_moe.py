"""Mixture-of-experts adapters (qwen3moe, gpt-oss, mixtral): parity through the pinned llama-server against
transformers + peft (float32), in convert and merge.

Per family a tiny random model (4 experts, top-2, hidden 64, 2 layers) is converted to a base GGUF by
llama.cpp's own convert_hf_to_gguf.py; PEFT adapters are converted by gguf-lora; one llama-server loads them
all (and two deliberately wrong files), every request naming each adapter's scale. Variants:
- experts_attn: attention (target_modules) + experts and router (target_parameters: PEFT's ParamWrapper,
  the stacked format transformers >= 5 writes);
- layer_restricted: gate_up only in layer 1, down only in layer 0 (the gpt-oss recipes' per-layer targets);
- rslora: rsLoRA with a rank_pattern on gate_up and an alpha_pattern on down, folded into lora_b;
- per_expert (qwen3moe, mixtral): the transformers 4 per-expert format, which PEFT itself converts on load.
The negative controls are the experts_attn file with the gate/up split of the other kind (halves <->
interleaved) and with lora_b read expert-major: the comparison must reject both.

Tolerances are test_parity's (f32 adapters differ by summation order only: measured <= 1e-5); the merged
q8_0 / q4_k_m models round every weight (parity 0.3), and their bytes equal llama-quantize's from the exact
f32 merge. gpt-oss's expert weights are made MXFP4-representable before the base is written, so a base
whose experts llama-quantize stores in MXFP4 is still exactly the HF model: merging into it (`same` keeps
MXFP4) is compared with PEFT and, byte for byte, with llama-quantize.
"""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

import tiny
from gguf_lora import convert, merge
from llamacpp import Server, assert_same_tensors, hf_to_gguf, llama_quantize
from test_parity import PROMPT, TOL, compare, torch_logprobs

pytestmark = [pytest.mark.llama_cpp, pytest.mark.parity]

ARCHS = list(tiny.MOE)
SPLIT = {"qwen3moe": "halves", "gpt-oss": "interleaved", "mixtral": "halves"}
ROUTER = {"qwen3moe": "mlp.gate.weight", "gpt-oss": "mlp.router.weight", "mixtral": "mlp.gate.weight"}
PER_EXPERT = {"qwen3moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
              "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"), "block_sparse_moe.gate")}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MERGE_TOL = {"f32": TOL, "q8_0": 0.3, "q4_k_m": 0.3}
# keep everything but the experts in f32 when llama-quantize writes an MXFP4 base (gpt-oss ships that way)
MXFP4_ONLY_EXPERTS = ("--output-tensor-type", "f32", "--token-embedding-type", "f32", "--tensor-type", "attn=f32")


def _variants(arch):
    """name -> LoraConfig kwargs."""
    out = {
        "experts_attn": dict(r=8, lora_alpha=16, target_modules=ATTN, target_parameters=EXPERTS + [ROUTER[arch]]),
        "layer_restricted": dict(r=4, lora_alpha=8, target_modules=None,
                                 target_parameters=["1.mlp.experts.gate_up_proj", "0.mlp.experts.down_proj"]),
        "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=None, target_parameters=EXPERTS,
                       rank_pattern={"gate_up_proj": 8}, alpha_pattern={"down_proj": 24}),
    }
    return out


def mxfp4_representable(model: torch.nn.Module, arch: str) -> None:
    """Round every expert weight to MXFP4 (gguf-py's quantizer), block by block along the rows llama.cpp
    quantizes (the input dimension): a base llama-quantize stores in MXFP4 then equals the HF model."""
    transposed = arch == "gpt-oss"  # (E, in, out) storage
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 3:
                continue
            w = p.data.transpose(1, 2) if transposed else p.data
            rows = w.reshape(-1, w.shape[-1]).numpy().astype(np.float32)
            q = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.MXFP4)
            back = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.MXFP4).reshape(w.shape))
            (p.data.transpose(1, 2) if transposed else p.data).copy_(back)


def make_per_expert_adapter(hf, folder, arch, seed=5, r=4):
    """A transformers-4-era adapter: one LoRA pair per expert module (and the router as a Linear), random,
    keyed and configured as PEFT wrote them then. PEFT (0.21) converts such files when it loads them."""
    stem, leaves, router = PER_EXPERT[arch]
    cfg = json.loads((hf / "config.json").read_text())
    hidden, ffn = cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    n_expert = cfg.get("num_experts") or cfg["num_local_experts"]
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape, fan_in: (torch.rand(*shape, generator=g) * 2 - 1) / fan_in ** 0.5  # noqa: E731
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        base = f"base_model.model.model.layers.{layer}"
        modules = [(f"{stem}.{e}.{leaf}", (ffn, hidden) if i == 2 else (hidden, ffn))
                   for e in range(n_expert) for i, leaf in enumerate(leaves)] + [(router, (hidden, n_expert))]
        for module, (fan_in, fan_out) in modules:
            tensors[f"{base}.{module}.lora_A.weight"] = u(r, fan_in, fan_in=fan_in)
            tensors[f"{base}.{module}.lora_B.weight"] = u(fan_out, r, fan_in=r) * 4
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "bias": "none", "target_modules": [*leaves, router.rsplit(".", 1)[-1]], "base_model_name_or_path": str(hf)}))
    return folder


def _stacked_b(folder, layer, out_rows):
    """PEFT's lora_B (out, r * E) of the expert wrapper of `layer` with `out_rows` rows, and its A rows."""
    tensors = load_file(folder / "adapter_model.safetensors")
    for key, b in tensors.items():
        if f"layers.{layer}.mlp.experts" in key and "lora_B" in key and b.shape[0] == out_rows:
            return b, tensors[key.replace("lora_B", "lora_A")].shape[0]
    raise KeyError(layer)


def write_wrong(good, folder, out, arch, how, n_expert, ffn, hidden):
    """A copy of a correct GGUF LoRA with the experts' lora_b laid out wrongly: the gate/up split of the
    other kind, or B's columns read expert-major (the unsloth-zoo#1269 bug)."""
    shutil.copyfile(good, out)
    reader = gguf.GGUFReader(out, "r+")
    tensors = {t.name: t for t in reader.tensors}
    for layer in range(2):
        for stem, out_rows in (("gate_up", 2 * ffn), ("down", hidden)):
            b, rows = _stacked_b(folder, layer, out_rows)
            rank = rows // n_expert
            if how == "b_order":
                b3 = b.reshape(out_rows, n_expert, rank).transpose(1, 0, 2)
            else:
                b3 = b.reshape(out_rows, rank, n_expert).transpose(2, 0, 1)
            split = SPLIT[arch] if how == "b_order" else {"halves": "interleaved", "interleaved": "halves"}[SPLIT[arch]]
            if stem == "down":
                parts = {"ffn_down_exps": b3}
            elif split == "halves":
                parts = {"ffn_gate_exps": b3[:, :ffn], "ffn_up_exps": b3[:, ffn:]}
            else:
                parts = {"ffn_gate_exps": b3[:, 0::2], "ffn_up_exps": b3[:, 1::2]}
            for name, value in parts.items():
                t = tensors[f"blk.{layer}.{name}.weight.lora_b"]
                t.data[...] = value.astype(np.float32)
    reader.data.flush()
    return out


class MoeEnv:
    def __init__(self, arch, root):
        self.arch, self.root = arch, root
        self.hf = root / "hf"
        model = tiny.make_base(arch, self.hf)
        if arch == "gpt-oss":
            mxfp4_representable(model, arch)
            model.save_pretrained(self.hf)
        cfg = json.loads((self.hf / "config.json").read_text())
        self.n_expert = cfg.get("num_experts") or cfg["num_local_experts"]
        self.ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        self.hidden = cfg["hidden_size"]
        self.base_gguf = hf_to_gguf(self.hf, root / "base.gguf", spm_vocab=True)
        self.adapters, self.ids, files = {}, {}, []
        for i, (name, lora) in enumerate(_variants(arch).items()):
            self.adapters[name] = tiny.make_adapter(self.hf, root / name, seed=i + 1, **lora)
        if arch in PER_EXPERT:
            self.adapters["per_expert"] = make_per_expert_adapter(self.hf, root / "per_expert", arch)
        for name, folder in self.adapters.items():
            outtype = "f16" if name == "layer_restricted" else "f32"
            self.ids[name] = len(files)
            files.append(convert(folder, self.base_gguf, root / f"{name}.gguf", outtype=outtype).output)
        geometry = (self.n_expert, self.ffn, self.hidden)
        for how in ("split", "b_order"):
            self.ids[f"wrong_{how}"] = len(files)
            files.append(write_wrong(files[self.ids["experts_attn"]], self.adapters["experts_attn"],
                                     root / f"wrong_{how}.gguf", arch, how, *geometry))
        self.server = Server(self.base_gguf, files, root / "server.log")
        self.base_model = tiny.load_base_model(self.hf)

    def llama(self, variant, scale=1.0):
        scales = {i: 0.0 for i in self.ids.values()}
        scales[self.ids[variant]] = scale
        return self.server.complete(PROMPT, scales)

    def reference(self, variant):
        return tiny.load_peft_model(self.hf, self.adapters[variant])

    def peft_merged_gguf(self):
        """llama.cpp's own path for a merged model: PEFT's merge_and_unload, saved, convert_hf_to_gguf.py."""
        out = self.root / "peft-merged.gguf"
        if not out.exists():
            folder = self.root / "peft-merged"
            self.reference("experts_attn").merge_and_unload().save_pretrained(folder)
            for name in ("tokenizer.model", "tokenizer_config.json"):
                shutil.copyfile(self.hf / name, folder / name)
            hf_to_gguf(folder, out, spm_vocab=True)
        return out


@pytest.fixture(scope="module", params=ARCHS)
def env(request, tmp_path_factory):
    e = MoeEnv(request.param, tmp_path_factory.mktemp(request.param))
    yield e
    e.server.stop()


@pytest.mark.parametrize("variant", ["experts_attn", "layer_restricted", "rslora", "per_expert"])
def test_adapter_matches_peft(env, variant, record_property):
    if variant == "per_expert" and env.arch not in PER_EXPERT:
        assert env.arch == "gpt-oss"  # gpt-oss never had per-expert modules (its experts were always 3-D)
        return
    steps = env.llama(variant, 0.5 if variant == "rslora" else 1.0)
    model = env.reference(variant)
    if variant == "rslora":
        for module in model.modules():
            if hasattr(module, "set_scale") and hasattr(module, "scaling"):
                module.set_scale("default", 0.5)
    ref = torch_logprobs(model, steps)
    record_property("max_dlogprob", compare(steps, ref, TOL))
    assert (ref - torch_logprobs(env.base_model, steps)).abs().max().item() > 20 * TOL  # the adapter acts


@pytest.mark.parametrize("how", ["split", "b_order"])
def test_wrong_expert_layout_fails_the_comparison(env, how, record_property):
    """Negative control: the same comparison rejects a gate/up split of the other kind and lora_b read
    expert-major, so the parity above is a real check of the layout."""
    steps = env.llama(f"wrong_{how}")
    ref = torch_logprobs(env.reference("experts_attn"), steps)
    record_property("max_dlogprob", worst := _worst(steps, ref))
    with pytest.raises(AssertionError):
        compare(steps, ref, TOL)
    assert worst > 10 * TOL


def _worst(steps, ref):
    return max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, s in enumerate(steps) for t in s["top_logprobs"])


def _served(model, log):
    server = Server(model, [], log)
    try:
        return server.complete(PROMPT, {})
    finally:
        server.stop()


def _same_output(ours, theirs, tol):
    """Two llama-server runs give the same greedy tokens and top-k log-probabilities within tol."""
    assert [s["id"] for s in ours] == [s["id"] for s in theirs]
    worst = max(abs(a["logprob"] - b["logprob"]) for x, y in zip(ours, theirs)
                for a, b in zip(x["top_logprobs"], y["top_logprobs"]) if a["id"] == b["id"])
    assert worst <= tol, f"max |Δ logprob| = {worst:.3g} > {tol}"
    return worst


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_k_m"])
def test_merged_experts_match_peft(env, outtype, tmp_path, record_property):
    """W_e += s * B_e A_e per expert, streamed, typed by llama-quantize's MoE rules.

    f32 is compared with PEFT in PyTorch. A quantized tiny model is off by its quantization alone (the bare
    base at q4_k_m differs from PyTorch by ~1.3 in log-probability), so q8_0 / q4_k_m are compared with what
    llama.cpp's own tools make of PEFT's merge (merge_and_unload -> convert_hf_to_gguf.py -> llama-quantize),
    run by the same llama-server, and their bytes must be llama-quantize's of our exact (f32) merge."""
    adapter = env.adapters["experts_attn"]
    merged = merge(env.base_gguf, [(adapter, 1.0)], tmp_path / "m.gguf", outtype)
    steps = _served(merged.output, tmp_path / "ours.log")
    if outtype == "f32":
        record_property("max_dlogprob", compare(steps, torch_logprobs(env.reference("experts_attn"), steps), TOL))
        via_gguf = merge(env.base_gguf, [(env.root / "experts_attn.gguf", 1.0)], tmp_path / "g.gguf", "f32")
        assert_same_tensors(via_gguf.output, merged.output)  # a GGUF LoRA merges exactly as its PEFT folder
        return
    exact = merge(env.base_gguf, [(adapter, 1.0)], tmp_path / "f32.gguf", "f32")
    assert_same_tensors(merged.output, llama_quantize(exact.output, tmp_path / "theirs.gguf", outtype))
    theirs = llama_quantize(env.peft_merged_gguf(), tmp_path / "peft.gguf", outtype)
    record_property("max_dlogprob", _same_output(steps, _served(theirs, tmp_path / "theirs.log"), TOL))


def test_merge_keeps_mxfp4_experts(env, tmp_path, record_property):
    """gpt-oss ships its experts in MXFP4: `same` re-encodes the merged experts in MXFP4, byte for byte as
    llama-quantize does from the exact merge, and runs as llama.cpp's own path from PEFT's merge does."""
    if env.arch != "gpt-oss":
        return
    base = llama_quantize(env.base_gguf, tmp_path / "base-mxfp4.gguf", "mxfp4_moe", *MXFP4_ONLY_EXPERTS)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(base).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "MXFP4" and types["blk.0.attn_q.weight"] == "F32"
    # the MXFP4 base holds the HF model's weights exactly; ggml's MXFP4 matmul rounds the activations to
    # Q8_0 (vec_dot_type), which alone moves the log-probabilities by ~5e-2 (measured)
    bare = _served(base, tmp_path / "base.log")
    record_property("base_max_dlogprob", compare(bare, torch_logprobs(env.base_model, bare), 0.1))
    merged = merge(base, [(env.adapters["experts_attn"], 1.0)], tmp_path / "m.gguf", "same")
    assert merged.types["MXFP4"] == 6
    exact = merge(base, [(env.adapters["experts_attn"], 1.0)], tmp_path / "f32.gguf", "f32")
    assert_same_tensors(merged.output, llama_quantize(exact.output, tmp_path / "theirs.gguf", "mxfp4_moe",
                                                      *MXFP4_ONLY_EXPERTS))
    theirs = llama_quantize(env.peft_merged_gguf(), tmp_path / "peft.gguf", "mxfp4_moe", *MXFP4_ONLY_EXPERTS)
    steps = _served(merged.output, tmp_path / "ours.log")
    record_property("max_dlogprob", _same_output(steps, _served(theirs, tmp_path / "theirs.log"), TOL))
    # and against PyTorch: the merged experts rounded to 4 bits (measured ~1 in log-probability)
    record_property("max_dlogprob_vs_pytorch", _worst(steps, torch_logprobs(env.reference("experts_attn"), steps)))


def test_hf_folder_base_gives_the_same_file(env, tmp_path):
    """With the HF folder as base the expert shapes come from its config (what the converter writes)."""
    ours = convert(env.adapters["experts_attn"], env.hf, tmp_path / "hf.gguf", outtype="f32")
    assert ours.shapes_validated
    assert_same_tensors(ours.output, env.root / "experts_attn.gguf")


def test_inspect_shows_experts(env):
    from gguf_lora.inspect import inspect, render

    peft = inspect(env.adapters["experts_attn"], env.base_gguf)
    assert peft["fits"] is True
    stacked = [p for p in peft["pairs"] if p["experts"]]
    assert len(stacked) == 4 and {p["rank"] for p in stacked} == {8}
    text = render(inspect(env.root / "experts_attn.gguf", env.base_gguf))
    assert "pair blk.0.ffn_down_exps.weight" in text and f"{env.n_expert} experts x rank    8" in text
    assert text.endswith("yes")


def test_llama_cpp_yarn_ignores_gpt_oss_truncate_false(tmp_path, record_property):
    """Why the tiny gpt-oss above uses plain RoPE: gpt-oss configs ask for YaRN with truncate=False
    (transformers keeps the correction range fractional), and llama.cpp always truncates it
    (ggml_rope_yarn_corr_dims: floorf / ceilf), so the bare base already differs from transformers. When
    this starts to pass within TOL, llama.cpp has fixed it and the tiny model can use gpt-oss's own RoPE."""
    model = tiny.make_base("gpt-oss", tmp_path / "hf", rope_parameters=None, max_position_embeddings=131072)
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["truncate"] is False
    steps = _served(hf_to_gguf(tmp_path / "hf", tmp_path / "base.gguf", spm_vocab=True), tmp_path / "server.log")
    record_property("max_dlogprob", worst := _worst(steps, torch_logprobs(model, steps)))
    assert worst > TOL
