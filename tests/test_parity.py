"""End-to-end parity: llama-server (pinned build) with our GGUF LoRA vs transformers + peft.

For every supported architecture a tiny random HF model is written, converted to a base GGUF by llama.cpp's
own convert_hf_to_gguf.py (f32), and given one PEFT adapter per variant. One llama-server per architecture
loads all of them; each request names every adapter explicitly (the others at scale 0) with the prompt
cache off. We compare, at every greedy step, the log-probabilities of llama.cpp's top-k tokens with
PyTorch's for the same tokens, and the greedy tokens themselves.

llama-server runs with an f32 KV cache and flash attention off: its defaults (f16 cache; the CPU flash
attention kernel converts Q to f16) add ~5e-3 of their own, which would hide the adapter's error.

Tolerance: the base is f32 and llama.cpp computes in f32, so f32 adapters differ by summation order only
(measured ≤ 1e-5 for llama/qwen/phi3; ~2e-3 for the gemma family, whose GELU llama.cpp evaluates through
an f16 table). An f16 adapter file rounds lora_a / lora_b to f16 and llama.cpp multiplies them with
activations rounded to f16 (relative 2^-11 each on the update; measured ≤ 4e-3). 1e-2 in log-probability
leaves a margin over all of these while a wrong scale, layout or permutation is off by 0.1–10. Q8_0
adapters round lora_a and lora_b to 8 bits per 32-block (relative up to 2^-8 of the block maximum on the
update; measured ≤ 1e-2 with scale 0.25): 5e-2.
"""
from __future__ import annotations

import pytest
import torch

import tiny
from gguf_lora import UnsupportedError, convert
from llamacpp import Server, assert_same_tensors, hf_to_gguf, llama_quantize

pytestmark = [pytest.mark.llama_cpp, pytest.mark.parity]

ARCHS = list(tiny.ARCHS)
TOL = 1e-2
TOL_Q8 = 5e-2
PROMPT = [1, 17, 33, 54, 70, 91, 12, 8, 44, 101]


def _attn(arch):
    return ["qkv_proj", "o_proj"] if arch == "phi3" else ["q_proj", "k_proj", "v_proj", "o_proj"]


def _variants(arch):
    """name -> (LoraConfig kwargs, adapter dtype, outtype, user scale)."""
    q, down, up = ("qkv_proj", "down_proj", "gate_up_proj") if arch == "phi3" else ("q_proj", "down_proj", "up_proj")
    v = "qkv_proj" if arch == "phi3" else "v_proj"
    return {
        "all_linear": (dict(r=8, lora_alpha=16), torch.float32, "f16", 1.0),
        "all_linear_scale_half": (dict(r=8, lora_alpha=16), torch.float32, "f32", 0.5),
        "attn_only_r4": (dict(r=4, lora_alpha=8, target_modules=_attn(arch)), torch.float32, "f32", 1.0),
        "rslora_r16": (dict(r=16, lora_alpha=8, use_rslora=True), torch.float32, "f32", 1.0),
        "patterns": (dict(r=8, lora_alpha=16, rank_pattern={q: 2, down: 12},
                          alpha_pattern={v: 3, f"layers.1.mlp.{up}": 40}), torch.float32, "f32", 1.0),
        "embedding": (dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", *_attn(arch)[:1]]),
                      torch.float32, "f32", 1.0),
        "f16_weights": (dict(r=8, lora_alpha=16), torch.float16, "f16", 1.0),
        "bf16_weights": (dict(r=8, lora_alpha=16), torch.bfloat16, "f32", 1.0),
        "q8_0_out": (dict(r=32, lora_alpha=8), torch.float32, "q8_0", 1.0),
    }


VARIANTS = list(_variants("llama"))


class ArchEnv:
    def __init__(self, arch, root):
        self.arch, self.root = arch, root
        self.hf = root / "hf"
        tiny.make_base(arch, self.hf)
        self.base_gguf = hf_to_gguf(self.hf, root / "base.gguf")
        self.adapters, self.ids, self.refused = {}, {}, {}
        files = []
        for name, (lora, dtype, outtype, _) in _variants(arch).items():
            folder = tiny.make_adapter(self.hf, root / name, seed=len(files) + 1, dtype=dtype, **lora)
            self.adapters[name] = folder
            try:
                result = convert(folder, self.base_gguf, root / f"{name}.gguf", outtype=outtype)
            except UnsupportedError as e:  # embedding LoRA on a tied base: refused, checked by the test
                self.refused[name] = e
                continue
            self.ids[name] = len(files)
            files.append(result.output)
        self.server = Server(self.base_gguf, files, root / "server.log")
        self.base_model = tiny.load_base_model(self.hf)

    def llama(self, variant: str | None, scale: float = 1.0):
        scales = {i: 0.0 for i in self.ids.values()}
        if variant is not None:
            scales[self.ids[variant]] = scale
        return self.server.complete(PROMPT, scales)


@pytest.fixture(scope="module", params=ARCHS)
def env(request, tmp_path_factory):
    e = ArchEnv(request.param, tmp_path_factory.mktemp(request.param))
    yield e
    e.server.stop()


def torch_logprobs(model, steps):
    ids = PROMPT + [s["id"] for s in steps]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(steps)]


def compare(steps, ref, tol):
    """Max |Δ logprob| over llama.cpp's top-k at every step; greedy tokens must be PyTorch's argmax."""
    worst = 0.0
    for i, step in enumerate(steps):
        for top in step["top_logprobs"]:
            worst = max(worst, abs(top["logprob"] - ref[i, top["id"]].item()))
        best = ref[i].max().item()
        assert ref[i, step["id"]].item() >= best - tol, f"step {i}: greedy token {step['id']} is not PyTorch's argmax"
    assert worst <= tol, f"max |Δ logprob| = {worst:.3g} > {tol}"
    return worst


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_matches_peft(env, variant, record_property):
    lora, _, outtype, scale = _variants(env.arch)[variant]
    if variant in env.refused:
        assert variant == "embedding" and env.arch in tiny.TIED
        assert "merge" in str(env.refused[variant]) and "tie" in str(env.refused[variant])
        return
    steps = env.llama(variant, scale)
    model = tiny.load_peft_model(env.hf, env.adapters[variant])
    if scale != 1.0:
        for module in model.modules():
            if hasattr(module, "set_scale") and hasattr(module, "scaling"):
                module.set_scale("default", scale)
    ref = torch_logprobs(model, steps)
    worst = compare(steps, ref, TOL_Q8 if outtype == "q8_0" else TOL)
    record_property("max_dlogprob", worst)
    # the adapter is really active: the bare base gives clearly different numbers on the same tokens
    bare = torch_logprobs(env.base_model, steps)
    assert (ref - bare).abs().max().item() > 20 * TOL


def test_control_scale_zero_is_bare_base(env):
    steps = env.llama(None)
    compare(steps, torch_logprobs(env.base_model, steps), TOL)


MERGE_TOL = {"f32": TOL, "f16": 5e-2, "q8_0": 0.3}


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_model_matches_peft(env, outtype, tmp_path):
    """gguf-lora merge bakes the adapter in; llama-server runs the merged file with no adapter.

    The f32 merge keeps the adapter's tolerance (measured ≤ 1e-5; gemma family ≤ 2e-3, its f16 GELU table).
    f16 and q8_0 round every weight of the model (and llama.cpp rounds activations to the weight type for
    the matmul), not only the update: measured ≤ 2.2e-2 (f16) and ≤ 0.17 (q8_0) on these sharply peaked
    tiny models, hence 5e-2 and 0.3. Those two are also checked byte for byte against llama-quantize run on
    the f32 merge, so the tolerance only covers rounding that llama.cpp itself would do.
    """
    from gguf_lora import merge

    merged = merge(env.base_gguf, [(env.adapters["all_linear"], 1.0), (env.adapters["attn_only_r4"], 0.5)],
                   tmp_path / "merged.gguf", outtype)
    server = Server(merged.output, [], tmp_path / "server.log")
    try:
        steps = server.complete(PROMPT, {})
    finally:
        server.stop()
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny.load_base_model(env.hf), env.adapters["all_linear"], adapter_name="a")
    model.load_adapter(env.adapters["attn_only_r4"], adapter_name="b")
    model.base_model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", combination_type="cat")
    model.set_adapter("ab")
    compare(steps, torch_logprobs(model.eval(), steps), MERGE_TOL[outtype])
    if outtype != "f32":  # the same bytes as llama.cpp's own tool gives from the exact (f32) merge
        exact = merge(env.base_gguf, [(env.adapters["all_linear"], 1.0), (env.adapters["attn_only_r4"], 0.5)],
                      tmp_path / "merged-f32.gguf", "f32")
        assert_same_tensors(merged.output, llama_quantize(exact.output, tmp_path / "theirs.gguf", outtype))


def test_merged_embedding_lora_on_tied_base(env, tmp_path):
    """PEFT changes the lookup only; the merged file keeps the output projection as a separate tensor
    (llama.cpp would otherwise tie it to the changed token_embd). gemma and gemma2 have no slot for one."""
    from gguf_lora import UnsupportedError as Unsupported
    from gguf_lora import merge

    if env.arch in ("gemma", "gemma2"):
        with pytest.raises(Unsupported, match="always ties"):
            merge(env.base_gguf, [(env.adapters["embedding"], 1.0)], tmp_path / "m.gguf", "f32")
        assert not (tmp_path / "m.gguf").exists()
        return
    merged = merge(env.base_gguf, [(env.adapters["embedding"], 1.0)], tmp_path / "m.gguf", "f32")
    server = Server(merged.output, [], tmp_path / "server.log")
    try:
        steps = server.complete(PROMPT, {})
    finally:
        server.stop()
    compare(steps, torch_logprobs(tiny.load_peft_model(env.hf, env.adapters["embedding"]), steps), TOL)


@pytest.mark.parametrize("feature", ["dora", "modules_to_save", "lora_bias"])
def test_merge_bakes_in_what_a_lora_file_cannot(env, feature, tmp_path):
    """DoRA (PEFT's magnitude / row-norm merge), modules_to_save (full replacement) and LoRA biases (added
    to the base's bias, or written as a new bias tensor where llama.cpp's graph has a slot for one),
    through llama-server, against PEFT loading the same folder."""
    from gguf_lora import merge

    lm_head = [] if env.arch in tiny.TIED else ["lm_head"]
    with_slots = _attn(env.arch) if tiny.GGUF_ARCH.get(env.arch, env.arch) == "llama" else _attn(env.arch)[:-1]
    lora = {"dora": dict(use_dora=True), "lora_bias": dict(lora_bias=True, target_modules=with_slots),
            "modules_to_save": dict(modules_to_save=lm_head or None, target_modules=_attn(env.arch))}[feature]
    if feature == "modules_to_save" and not lm_head:
        lora["modules_to_save"] = [_attn(env.arch)[-1]]  # o_proj trained fully, LoRA on the rest
        lora["target_modules"] = _attn(env.arch)[:-1]
    folder = tiny.make_adapter(env.hf, tmp_path / feature, seed=7, r=4, lora_alpha=8, **lora)
    if feature == "lora_bias" and with_slots != _attn(env.arch):  # no o_proj bias in this arch's graph
        o_proj = tiny.make_adapter(env.hf, tmp_path / "o_bias", r=4, lora_bias=True, target_modules=["o_proj"])
        with pytest.raises(UnsupportedError, match="has no bias for blk.0.attn_output.bias"):
            merge(env.base_gguf, [(o_proj, 1.0)], tmp_path / "o.gguf", "f32")
    merged = merge(env.base_gguf, [(folder, 1.0)], tmp_path / "m.gguf", "f32")
    server = Server(merged.output, [], tmp_path / "server.log")
    try:
        steps = server.complete(PROMPT, {})
    finally:
        server.stop()
    model = tiny.load_peft_model(env.hf, folder)
    compare(steps, torch_logprobs(model, steps), TOL)
    bare = torch_logprobs(env.base_model, steps)
    assert (torch_logprobs(model, steps) - bare).abs().max().item() > 20 * TOL
