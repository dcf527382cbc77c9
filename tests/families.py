"""Pico models of the 2026 families (tests/test_families.py): tiny random transformers models whose config
exercises what the family's LoRA needs (qwen35: more value heads than key heads; gemma4: per-layer embeddings
and a vocabulary the converter trims), saved with a tokenizer that llama.cpp's unmodified convert_hf_to_gguf.py
accepts for that family.

Tokenizers, all offline:
- spm: the sentencepiece model of tests/tiny.py (families whose converter tries sentencepiece first);
- spm_json: the same as a transformers tokenizer.json (gemma4's converter reads it through gguf-py's
  LlamaHfVocab), without an added_tokens list, so that the converter's vocabulary count is the real one;
- gpt2: GPT-2's BPE vocabulary and merges read from the pinned llama.cpp tree's models/ggml-vocab-gpt-2.gguf,
  plus <|user|> (glm4's converter looks it up). Families that only take a BPE tokenizer.json check its
  pre-tokenizer by hashing how it splits a fixed text (conversion/base.py get_vocab_base_pre); this one hashes
  as openai-community/gpt2 does, so the converter runs as it would on a real checkpoint. Its 50258 tokens make
  these models' embeddings the largest part of them (3.2M parameters).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

import tiny

BASE = dict(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, initializer_range=0.2, rms_norm_eps=1e-6)
GPT2_VOCAB = 50258
# M-RoPE sections sum to half the rotary dims, t first and 3*t >= the sum, as in the real checkpoints: llama.cpp's
# interleaved M-RoPE gives the 4th ("extra") position to a pair that lies beyond 3*t, transformers keeps t there.
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]}


def _qwen35(T):
    cfg = T.Qwen3_5TextConfig(**{**BASE, "vocab_size": GPT2_VOCAB}, head_dim=32, tie_word_embeddings=False,
                              layer_types=["linear_attention", "full_attention"],
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                               "mrope_interleaved": True},
                              linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                              linear_num_value_heads=4)  # value heads != key heads: the converter reorders them
    return T.Qwen3_5ForCausalLM(cfg), "gpt2"


def _gemma4(T):
    # vocab 160 in the model, 128 in the tokenizer: the converter trims token_embd to 128 rows (trim_vocab);
    # tied output as the released checkpoints; per-layer embeddings (PLE) as E2B / E4B. The converter does not
    # trim the per-layer embedding, which llama.cpp then refuses to load (expected 128 rows, got 160), so that one
    # has the tokenizer's 128 rows (the released checkpoints have no rows to trim in either).
    # Weights of std 0.02, not 0.2: gemma4's unscaled attention (scaling 1.0 after q/k norms) makes the bare
    # base differ from PyTorch by 0.1-0.2 in log-probability at std 0.2 (2e-4 at 0.02, measured).
    cfg = T.Gemma4TextConfig(**{**BASE, "vocab_size": 160, "initializer_range": 0.02}, head_dim=16, global_head_dim=32, sliding_window=64,
                             layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=8,
                             vocab_size_per_layer_input=tiny.VOCAB, num_kv_shared_layers=0, tie_word_embeddings=True)
    return T.Gemma4ForCausalLM(cfg), "spm_json"


def _mistral3(T):
    text = dict(model_type="mistral", **BASE, sliding_window=None, head_dim=16)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
    cfg = T.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_index=10)
    return T.Mistral3ForConditionalGeneration(cfg), "spm"


def _qwen2vl(T):
    text = dict(**BASE, model_type="qwen2_5_vl_text", rope_parameters=MROPE)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=16, patch_size=14)
    cfg = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=120,
                             video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    return T.Qwen2_5_VLForConditionalGeneration(cfg), "spm"


def _qwen3vl(T):
    text = dict(**BASE, head_dim=16, model_type="qwen3_vl_text", rope_parameters={**MROPE, "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[], patch_size=16, num_position_embeddings=16)
    cfg = T.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=120,
                          video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    return T.Qwen3VLForConditionalGeneration(cfg), "spm"


# Mixture-of-experts variants (tests/test_moe_families.py): 4 experts, top-2, expert ffn 48 (so that no expert
# tensor is square: transformers tells its two layouts of qwen3vlmoe's experts apart by shape alone).
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[],
           norm_topk_prob=True)


def _qwen3vlmoe(T):
    text = dict(**BASE, head_dim=16, model_type="qwen3_vl_moe_text", **MOE,
                rope_parameters={**MROPE, "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[], patch_size=16, num_position_embeddings=16)
    cfg = T.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=120,
                             video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    return T.Qwen3VLMoeForConditionalGeneration(cfg), "spm"


def _qwen35moe(T):
    # qwen35's linear attention (value heads != key heads) with 4 experts and a shared expert; the sentencepiece
    # vocabulary of tiny.py, which the tests' converter wrapper reads (llamacpp.hf_to_gguf spm_vocab)
    cfg = T.Qwen3_5MoeTextConfig(**BASE, head_dim=32, tie_word_embeddings=False,
                                 layer_types=["linear_attention", "full_attention"],
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                                  "mrope_interleaved": True},
                                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                 linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=48, shared_expert_intermediate_size=40)
    return T.Qwen3_5MoeForCausalLM(cfg), "spm"


def _gemma4moe(T):
    # gemma4 26B-A4B's shape: a dense MLP and 4 experts (top-2) side by side in every layer, no per-layer
    # embeddings; router.per_expert_scale and router.scale away from their initial ones (make_base), so that
    # where the per-expert scale applies matters
    cfg = T.Gemma4TextConfig(**{**BASE, "vocab_size": 160, "initializer_range": 0.02}, head_dim=16, global_head_dim=32,
                             sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                             hidden_size_per_layer_input=0, num_kv_shared_layers=0, tie_word_embeddings=True,
                             enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=48,
                             final_logit_softcapping=30.0)
    model = T.Gemma4ForCausalLM(cfg)
    with torch.no_grad():  # the tied output at std 0.02 makes near-uniform logits that hide any error: sharpen them
        model.model.norm.weight.mul_(10)
    return model, "spm_json"


# Families whose released checkpoints store the experts transposed against transformers' modules, as
# (E, hidden, 2 x ffn) and (E, ffn, hidden): transformers transposes them on load (conversion_mapping.py
# Transpose(1, 2, check_dims=True)) and saves them back untransposed (the reverse op sees the module's shape
# and keeps it), while llama.cpp's converter expects the released layout (conversion/qwen3vl.py
# Qwen3VLMoeTextModel.modify_tensors). make_base writes the released layout, as a downloaded checkpoint has.
HUB_TRANSPOSED = {"qwen3vlmoe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}

FAMILIES = {
    "qwen35": _qwen35,
    "gemma4": _gemma4,
    "mistral3": _mistral3,
    "qwen2vl": _qwen2vl,
    "qwen3vl": _qwen3vl,
    "qwen3vlmoe": _qwen3vlmoe,
    "qwen35moe": _qwen35moe,
    "gemma4moe": _gemma4moe,
    "smollm3": lambda T: (T.SmolLM3ForCausalLM(T.SmolLM3Config(**BASE, tie_word_embeddings=False)), "spm"),
    "granite": lambda T: (T.GraniteForCausalLM(T.GraniteConfig(
        **BASE, tie_word_embeddings=False, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=2.0)), "spm"),
    "olmo2": lambda T: (T.Olmo2ForCausalLM(T.Olmo2Config(**{**BASE, "vocab_size": GPT2_VOCAB},
                                                         tie_word_embeddings=False)), "gpt2"),
    "glm4": lambda T: (T.Glm4ForCausalLM(T.Glm4Config(**{**BASE, "vocab_size": GPT2_VOCAB},
                                                      tie_word_embeddings=False)), "gpt2"),
    "lfm2": lambda T: (T.Lfm2ForCausalLM(T.Lfm2Config(**{**BASE, "vocab_size": GPT2_VOCAB}, tie_word_embeddings=False,
                                                      layer_types=["conv", "full_attention"])), "gpt2"),
}
# convert_hf_to_gguf.py flags a family needs: Qwen3.5 checkpoints carry a multi-token-prediction block the
# converter wants unless told to leave it out (conversion/qwen.py _QwenMtpMixin); these pico models have none.
CONVERTER_FLAGS = {"qwen35": ("--no-mtp",), "qwen35moe": ("--no-mtp",)}


def make_base(family: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    model, tokenizer = FAMILIES[family](transformers)
    model = model.float().eval()
    with torch.no_grad():  # parameters a family initializes to ones, moved as training would (seeded)
        for name, p in model.named_parameters():
            if name.endswith("router.scale"):
                p.uniform_(0.5, 2.0)
            elif name.endswith("router.per_expert_scale"):  # far from 1, so that where it applies shows
                p.uniform_(0.25, 4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if family in HUB_TRANSPOSED:
        _transpose_experts(folder, HUB_TRANSPOSED[family])
    for name, data in _tokenizer_files(tokenizer).items():
        (folder / name).write_bytes(data)
    return model


def _transpose_experts(folder: Path, suffixes: tuple[str, ...]) -> None:
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        hits = [k for k in tensors if k.endswith(suffixes)]
        assert hits and all(tensors[k].shape[1] != tensors[k].shape[2] for k in hits)  # else the layout is ambiguous
        save_file({k: v.transpose(1, 2).contiguous() if k in hits else v for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})


def load_model(folder: Path) -> torch.nn.Module:
    """The transformers class config.json names (ForConditionalGeneration models are not AutoModelForCausalLM)."""
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32).eval()


def load_peft(base_folder: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_folder), adapter).eval()


@lru_cache(maxsize=None)
def _tokenizer_files(kind: str) -> dict[str, bytes]:
    config = {"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"}
    if kind == "spm":
        return {"tokenizer.model": tiny.sentencepiece_model(), "tokenizer_config.json": json.dumps(config).encode()}
    if kind == "spm_json":
        return {"tokenizer.json": _spm_json(), "tokenizer_config.json": json.dumps(
            {**config, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}).encode()}
    return {"tokenizer.json": _gpt2_json(), "tokenizer_config.json": json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}).encode()}


def _spm_json() -> bytes:
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        (src / "tokenizer.model").write_bytes(tiny.sentencepiece_model())
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        AutoTokenizer.from_pretrained(src).save_pretrained(src / "out")
        data = json.loads((src / "out" / "tokenizer.json").read_text())
    data["added_tokens"] = []  # its special tokens are pieces of the vocabulary already
    return json.dumps(data).encode()


def _gpt2_json() -> bytes:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from gguf_lora.gguf_read import GGUFFile
    from gguf_lora.llama_cpp import find_source_file

    reader = GGUFFile(find_source_file("models/ggml-vocab-gpt-2.gguf"))  # gguf-py's reader takes 9 s on its arrays
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|user|>", special=True)])
    return tok.to_str().encode()
