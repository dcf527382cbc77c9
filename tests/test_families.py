"""Parity for the 2026 families through the pinned llama-server against transformers + peft.

Per family: a pico model (tests/families.py), its base GGUF written by llama.cpp's convert_hf_to_gguf.py, a few
adapters converted by gguf-lora and served by one llama-server, and one merge into that base run by its own
llama-server, each compared with PEFT as tests/test_parity.py does (same prompt, same tolerance: f32 adapters
and merges differ from PyTorch by summation order only: measured ≤ 3.1e-4 for gemma4, ≤ 7.6e-5 for the
others, while the wrong conversions below are off by 3 to 8). Where a layout is subtle a
deliberately wrong conversion rides in the same server and must fail the comparison: qwen35's value-head order
(none at all; out_proj's reorder put on lora_B rows instead of lora_A columns) and a fused q/k/v tensor's scale
folded per block instead of against the combined rank.

Also here: the language_model prefixes of both checkpoint layouts (mistral3), an adapter trained on
Mistral3ForConditionalGeneration served on a base GGUF that says llama (older conversions), vision modules
refused by name and --text-only (qwen2vl), modules llama.cpp applies no LoRA to refused by convert and baked in
by merge (gemma4's per-layer model projection and per-layer embedding), and a --fuse-qkv base.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import families
import tiny
from gguf_lora import UnsupportedError, convert, merge
from gguf_lora import mapping
from gguf_lora.cli import app
from llamacpp import Server, hf_to_gguf
from test_parity import PROMPT, TOL, compare

pytestmark = [pytest.mark.llama_cpp, pytest.mark.parity]

RS = dict(r=8, lora_alpha=16, use_rslora=True)  # rsLoRA: every pair's scale is folded into lora_b
TEXT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the text model's modules of a multimodal model (its vision tower names its layers alike)
LANGUAGE_MODEL = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# family -> {adapter: LoraConfig kwargs}; "merge" is merged (f32) and served alone, the others are converted
# (f32) into one llama-server. Special adapters of the family tests below are listed here too.
ADAPTERS = {
    "qwen35": {"all_linear": RS, "merge": dict(
        r=4, lora_alpha=8, modules_to_save=["input_layernorm", "q_norm", "linear_attn.norm"])},
    "gemma4": {"text": dict(RS, target_modules=[*TEXT, "per_layer_input_gate", "per_layer_projection"]),
               "merge": dict(r=4, lora_alpha=8, target_modules=[*TEXT, "per_layer_model_projection",
                                                                "embed_tokens", "embed_tokens_per_layer"])},
    "mistral3": {"language_model": dict(RS, target_modules=LANGUAGE_MODEL)},
    "qwen2vl": {"all_linear": RS},  # all-linear catches model.visual.blocks.N.mlp.{gate,up,down}_proj too
    "qwen3vl": {"all_linear": dict(RS, target_modules=LANGUAGE_MODEL)},
    "smollm3": {"all_linear": RS},
    "granite": {"all_linear": RS},
    "olmo2": {"all_linear": RS},
    "glm4": {"all_linear": RS},
    "lfm2": {"all_linear": RS},  # conv.in_proj / conv.out_proj (shortconv), attention, feed_forward w1/w2/w3
    "fused_qkv": {"all_linear": dict(r=8, lora_alpha=16, rank_pattern={"k_proj": 4}, alpha_pattern={"v_proj": 24}),
                  "q_v": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                  "same_rank": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])},
}
MERGED = {"qwen35": "merge", "gemma4": "merge", "mistral3": "language_model", "fused_qkv": "all_linear"}
TEXT_ONLY = {"qwen2vl"}  # converted and merged with text_only=True
# The checks beyond parity of each converted adapter and one merge (test_family below).
SPECIAL = {"qwen35": ["wrong_value_heads", "hf_folder_base"], "fused_qkv": ["fused_layout"], "gemma4": ["no_runtime_hook"],
           "qwen2vl": ["vision_refused"], "mistral3": ["llama_base"]}
# One test per check, grouped by family so that each family's base, adapters and llama-server are built once.
CASES = [pytest.param(family, kind, name, id=f"{family}-{kind}" + (f"-{name}" if name else ""))
         for family, adapters in ADAPTERS.items()
         for kind, name in ([("convert", a) for a in adapters if a != "merge"]
                            + ([("convert", "old_layout")] if family == "mistral3" else [])
                            + [("merge", None)] + [(k, None) for k in SPECIAL.get(family, [])])]


class FamilyEnv:
    def __init__(self, family: str, root: Path):
        self.family, self.root, self.hf = family, root, root / "hf"
        if family == "fused_qkv":  # any architecture: a llama converted with --fuse-qkv (q/k permuted, then fused)
            tiny.make_base("llama", self.hf)
            flags = ("--fuse-qkv",)
        else:
            families.make_base(family, self.hf)
            flags = families.CONVERTER_FLAGS.get(family, ())
        self.base_gguf = hf_to_gguf(self.hf, root / "base.gguf", extra=flags)
        self.n_vocab = next(int(t.shape[-1]) for t in gguf.GGUFReader(self.base_gguf).tensors
                            if t.name == "token_embd.weight")
        self.adapters, self.ids, self.results, files = {}, {}, {}, []
        for i, (name, lora) in enumerate(ADAPTERS[family].items()):
            self.adapters[name] = tiny.make_adapter(self.hf, root / name, seed=i + 1, load=families.load_model,
                                                    **lora)
            if name != "merge":
                self.add(name, convert(self.adapters[name], self.base_gguf, root / f"{name}.gguf", outtype="f32",
                                       text_only=family in TEXT_ONLY), files)
        if family == "qwen35":
            self.add_wrong_v_heads(files)
        if family == "fused_qkv":
            with mock.patch.object(mapping, "_fold", lambda scale, alpha, rank: scale / (alpha / 8)):  # per block
                self.add("wrong_fold", convert(self.adapters["same_rank"], self.base_gguf, root / "wrong_fold.gguf",
                                               outtype="f32"), files)
        if family == "mistral3":
            self.add_old_layout(files)
        self.server = Server(self.base_gguf, files, root / "server.log")
        self.models: dict[str | None, torch.nn.Module] = {}

    def add(self, name: str, result, files: list) -> None:
        self.results[name] = result
        self.ids[name] = len(files)
        files.append(result.output)

    def add_wrong_v_heads(self, files: list) -> None:
        """The two plausible mistakes: no value-head reorder at all; out_proj's reorder on lora_B's rows (as
        for the input projections: its 64 output rows happen to match the index) instead of lora_A's columns."""
        identity = {t: (lambda arr, base: arr) for t in ("v_heads_rows", "v_heads_scalar_rows", "v_heads_qkv_rows")}
        with mock.patch.dict(mapping.ROW_TRANSFORMS, identity), \
                mock.patch.dict(mapping.COLUMN_TRANSFORMS, {"v_heads_cols": lambda arr, base: arr}):
            self.add("wrong_none", convert(self.adapters["all_linear"], self.base_gguf,
                                           self.root / "wrong_none.gguf", outtype="f32"), files)
        with mock.patch.dict(mapping.ROW_TRANSFORMS, {"v_heads_cols": mapping.v_heads_rows}), \
                mock.patch.dict(mapping.COLUMN_TRANSFORMS, {"v_heads_cols": lambda arr, base: arr}):
            self.add("wrong_rows", convert(self.adapters["all_linear"], self.base_gguf,
                                           self.root / "wrong_rows.gguf", outtype="f32"), files)

    def add_old_layout(self, files: list) -> None:
        """The same adapter as a transformers <= 4.51 checkpoint saves it: language_model.model.* and
        language_model.lm_head (transformers 5 loads it through conversion_mapping.py's renames)."""
        src, old = self.adapters["language_model"], self.root / "old_layout"
        shutil.copytree(src, old)
        tensors = load_file(old / "adapter_model.safetensors")
        renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
                   .replace("base_model.model.lm_head", "base_model.model.language_model.lm_head"): v
                   for k, v in tensors.items()}
        assert all("language_model.model." in k for k in renamed)
        save_file(renamed, old / "adapter_model.safetensors")
        self.adapters["old_layout"] = old
        self.add("old_layout", convert(old, self.base_gguf, self.root / "old_layout.gguf", outtype="f32"), files)

    def llama(self, name: str | None):
        scales = {i: 0.0 for i in self.ids.values()}
        if name is not None:
            scales[self.ids[name]] = 1.0
        return self.server.complete(PROMPT, scales)

    def reference(self, adapter: str | None, steps) -> torch.Tensor:
        """PyTorch's log-probabilities (PEFT loading the adapter folder, or the bare base) on llama.cpp's tokens."""
        if adapter not in self.models:
            self.models[adapter] = (families.load_peft(self.hf, self.adapters[adapter]) if adapter
                                    else families.load_model(self.hf))
        ids = PROMPT + [s["id"] for s in steps]
        with torch.no_grad():
            logits = self.models[adapter](torch.tensor([ids])).logits[0].double()
        # over llama.cpp's vocabulary: gemma4's converter drops the model's rows beyond the tokenizer's
        logits = logits[:, :self.n_vocab]
        return torch.log_softmax(logits, -1)[len(PROMPT) - 1: len(PROMPT) - 1 + len(steps)]


class Envs:
    """The family under test: built on first use, its llama-server stopped when the next family is asked for."""

    def __init__(self, tmp_path_factory):
        self.factory, self.current = tmp_path_factory, None

    def get(self, family: str) -> FamilyEnv:
        if self.current is None or self.current.family != family:
            self.close()
            self.current = FamilyEnv(family, self.factory.mktemp(family))
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.server.stop()
            self.current = None


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    e = Envs(tmp_path_factory)
    yield e
    e.close()


def check(env: FamilyEnv, steps, adapter: str, tol: float = TOL) -> float:
    """Parity with PEFT, and the adapter visibly changes the output (so a no-op would fail)."""
    ref = env.reference(adapter, steps)
    worst = compare(steps, ref, tol)
    assert (ref - env.reference(None, steps)).abs().max().item() > 20 * tol
    return worst


@pytest.mark.parametrize("family,kind,name", CASES)
def test_family(envs, family, kind, name, tmp_path, record_property):
    env = envs.get(family)
    figure = CHECKS[kind](env, name, tmp_path)
    if figure is not None:  # parity: the max |Δ logprob|; negative controls: the smallest error they show
        record_property("max_dlogprob" if kind in ("convert", "merge", "llama_base") else "wrong_dlogprob", figure)


def caught(env, wrong: str, reference: str) -> float:
    """A deliberately wrong conversion served next to the right one: the comparison must reject it, by far."""
    steps = env.llama(wrong)
    with pytest.raises(AssertionError):
        compare(steps, env.reference(reference, steps), TOL)
    ref = env.reference(reference, steps)
    error = max(abs(t["logprob"] - ref[i, t["id"]].item()) for i, s in enumerate(steps) for t in s["top_logprobs"])
    assert error > 10 * TOL, f"{wrong}: only {error:.3g} off"
    return error


def converted_adapter_matches_peft(env, adapter, tmp_path):
    return check(env, env.llama(adapter), "language_model" if adapter == "old_layout" else adapter)


def merged_model_matches_peft(env, _, tmp_path):
    """One merge per family (f32), run by llama-server with no adapter."""
    name = MERGED.get(env.family, "all_linear")
    text_only = env.family in TEXT_ONLY
    if text_only:  # the vision modules are refused first, by name
        with pytest.raises(UnsupportedError, match="llama.cpp's vision encoder takes no LoRA"):
            merge(env.base_gguf, [(env.adapters[name], 1.0)], tmp_path / "refused.gguf", "f32")
        assert not (tmp_path / "refused.gguf").exists()
    result = merge(env.base_gguf, [(env.adapters[name], 1.0)], tmp_path / "merged.gguf", "f32", text_only=text_only)
    assert bool(result.left_out) == text_only
    server = Server(Path(result.output), [], tmp_path / "server.log")
    try:
        steps = server.complete(PROMPT, {})
    finally:
        server.stop()
    return check(env, steps, name)
def wrong_value_heads_are_caught(env, _, tmp_path):
    """qwen35: the comparison sees a wrong value-head order, with no reorder and with out_proj's reorder on the
    wrong side of the product."""
    return min(caught(env, wrong, "all_linear") for wrong in ("wrong_none", "wrong_rows"))


def hf_folder_base(env, _, tmp_path):
    """qwen35 with the Hugging Face folder as --base: the head counts of the reorder come from config.json
    instead of the GGUF's ssm.* keys, and the file written is the same, tensor for tensor."""
    theirs = convert(env.adapters["all_linear"], env.hf, tmp_path / "hf.gguf", outtype="f32").output
    ours = {t.name: t for t in gguf.GGUFReader(env.results["all_linear"].output).tensors}
    other = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert ours.keys() == other.keys() and any(".ssm_out." in n for n in ours)
    for name, t in ours.items():
        assert bytes(t.data) == bytes(other[name].data), name


def fused_layout(env, _, tmp_path):
    """--fuse-qkv base: q/k/v pairs land on its one attn_qkv tensor, A stacked along the rank, B block-diagonal
    with the q/k permutation applied per block (the parity cases above); each block's scale is folded against
    the combined rank (q 8 + k 4 + v 8) that llama.cpp divides alpha by. Folding per block (wrong_fold: a 3x
    error on every block here) must be caught."""
    base = {t.name for t in gguf.GGUFReader(env.base_gguf).tensors}
    assert "blk.0.attn_qkv.weight" in base and "blk.0.attn_q.weight" not in base
    lora = {t.name: t.shape.tolist() for t in gguf.GGUFReader(env.results["all_linear"].output).tensors}
    assert lora["blk.0.attn_qkv.weight.lora_a"] == [64, 20] and lora["blk.0.attn_qkv.weight.lora_b"] == [20, 128]
    assert not any(".attn_q." in n or ".attn_k." in n or ".attn_v." in n for n in lora)
    return caught(env, "wrong_fold", "same_rank")


def no_runtime_hook(env, _, tmp_path):
    """gemma4: llama.cpp multiplies per_layer_model_proj with a raw ggml_mul_mat and looks up per_layer_token_embd
    with ggml_get_rows (src/models/gemma4.cpp), so a pair for them loads and is never applied: convert refuses
    each (the merge case shows merge baking both in)."""
    for module, tensor in (("per_layer_model_projection", "per_layer_model_proj"),
                           ("embed_tokens_per_layer", "per_layer_token_embd")):
        folder = tiny.make_adapter(env.hf, tmp_path / module, r=4, load=families.load_model, target_modules=[module])
        with pytest.raises(UnsupportedError, match=rf"{module} \({tensor}.weight\), which llama.cpp's gemma4 graph "
                                                   "uses without a LoRA hook"):
            convert(folder, env.base_gguf, tmp_path / "refused.gguf")
        assert not (tmp_path / "refused.gguf").exists()


def vision_refused(env, _, tmp_path):
    """qwen2vl: all-linear catches the vision tower; convert names it and stops, --text-only lists it."""
    folder, out = env.adapters["all_linear"], tmp_path / "out.gguf"
    result = CliRunner().invoke(app, ["convert", str(folder), "--base", str(env.base_gguf), "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: LoRA on model.visual.blocks.0.attn.proj (and ")
    assert "llama.cpp's vision encoder takes no LoRA" in result.stderr and "--text-only" in result.stderr
    result = CliRunner().invoke(app, ["convert", str(folder), "--base", str(env.base_gguf), "-o", str(out),
                                      "--text-only"])
    assert result.exit_code == 0, result.output
    left_out = env.results["all_linear"].left_out
    assert "model.visual.blocks.1.mlp.up_proj" in left_out and "model.visual.merger.mlp.0" in left_out
    assert not any(".language_model." in m for m in left_out)
    assert f"left out {len(left_out)} vision / audio modules (--text-only): model.visual." in result.stdout


def llama_base(env, _, tmp_path):
    """mistral3: older GGUFs of Mistral Small 3.x say general.architecture = llama, and llama.cpp refuses an
    adapter of another architecture, so the architecture (and every name) comes from the base GGUF. That base
    is written by llama.cpp's converter from the same weights saved as MistralForCausalLM; both checkpoint
    layouts of the adapter convert for it."""
    import transformers

    model = families.load_model(env.hf)
    text = transformers.MistralConfig(**model.config.text_config.to_dict())
    text.architectures = ["MistralForCausalLM"]
    llama_hf = tmp_path / "mistral"
    mistral = transformers.MistralForCausalLM(text)
    mistral.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in model.state_dict().items()
                             if "vision_tower" not in k and "multi_modal_projector" not in k})
    mistral.save_pretrained(llama_hf)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(env.hf / name, llama_hf / name)
    llama_gguf = hf_to_gguf(llama_hf, tmp_path / "llama.gguf")
    assert gguf.GGUFReader(llama_gguf).fields["general.architecture"].contents() == "llama"
    files = [convert(env.adapters[name], llama_gguf, tmp_path / f"{name}.gguf", outtype="f32")
             for name in ("language_model", "old_layout")]
    assert {f.arch for f in files} == {"llama"} and env.results["language_model"].arch == "mistral3"
    server = Server(llama_gguf, [Path(f.output) for f in files], tmp_path / "server.log")
    try:
        return max(check(env, server.complete(PROMPT, {i: 1.0, 1 - i: 0.0}), "language_model") for i in range(2))
    finally:
        server.stop()


CHECKS = {"convert": converted_adapter_matches_peft, "merge": merged_model_matches_peft,
          "wrong_value_heads": wrong_value_heads_are_caught, "hf_folder_base": hf_folder_base,
          "fused_layout": fused_layout,
          "no_runtime_hook": no_runtime_hook, "vision_refused": vision_refused, "llama_base": llama_base}
