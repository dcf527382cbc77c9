"""Pico models for tests: tiny random HF models of each supported architecture with a sentencepiece
tokenizer trained offline, and PEFT adapters on them (init_lora_weights=False, so B is not zero).

Everything is seeded, so a folder built twice is the same model.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2, rms_norm_eps=1e-6)

# arch key -> (transformers config class, model class, extra config); tied: whether llama.cpp ties output
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=64,
                                                         query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=64,
                                                             query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, num_key_value_heads=4,
                                                   original_max_position_embeddings=256)),
}
# Mixture-of-experts families (4 experts, top-2), kept apart from ARCHS: their parity suite is tests/test_moe.py.
# gpt-oss: default RoPE instead of its YaRN (llama.cpp ignores YaRN's truncate=False, a base-model difference
# of ~1e-2 in log-probability that has nothing to do with adapters); hidden = expert ffn, as in gpt-oss-20b.
MOE = {
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True)),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
        sliding_window=None)),
}
# GGUF architecture each HF family lands on (Mistral and Mixtral are llama in GGUF).
GGUF_ARCH = {"mistral": "llama", "mixtral": "llama"}
TIED = {"gemma", "gemma2", "gemma3"}


def sentencepiece_model(vocab: int = VOCAB, chat: bool = False) -> bytes:
    """A BPE sentencepiece model of exactly `vocab` pieces, trained on seeded pseudo-words.

    chat=True: byte fallback (any text tokenizes, as runtime tests need) and ChatML's two markers.
    """
    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [" ".join("".join(rng.choice(letters[:12]) for _ in range(rng.randint(1, 6)))
                      for _ in range(12)) for _ in range(400)]
    out = io.BytesIO()
    extra = dict(byte_fallback=True, user_defined_symbols=CHATML_MARKERS) if chat else {}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, num_threads=1,
                                   bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2, **extra)
    return out.getvalue()


CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_chat_base(arch: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model that takes any text: byte-fallback tokenizer (vocab 384) and a ChatML chat template."""
    vocab = 384
    model = make_base(arch, folder, seed, vocab_size=vocab, **overrides)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab, chat=True))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizer", "chat_template": CHATML,
        "eos_token": "<|im_end|>"}))
    return model


def make_base(arch: str, folder: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random `arch` model (float32 safetensors + tokenizer.model) to folder; return it."""
    import transformers

    config_cls, model_cls, extra = {**ARCHS, **MOE}[arch]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                                      "tokenizer_class": "LlamaTokenizer"}))
    return model


def load_base_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(base_folder: Path, folder: Path, seed: int = 1, dtype: torch.dtype = torch.float32,
                 load=None, **lora) -> Path:
    """Train nothing: a PEFT LoRA with random A and B on the base, saved with save_pretrained.

    load: how to load the base from its folder (default AutoModelForCausalLM; multimodal classes need theirs)."""
    from peft import LoraConfig, get_peft_model

    model = (load or load_base_model)(base_folder)
    torch.manual_seed(seed)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_embedding_B" in name:  # PEFT's default leaves it small; make the update visible
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:  # DoRA starts at ||W||: move it as training would
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            elif "lora_B" in name and name.endswith(".bias"):  # lora_bias starts at zero: give it a value
                p.normal_(0, 0.2)
            elif "modules_to_save" in name:  # a "trained" copy that differs from the base
                p.add_(torch.randn_like(p) * 0.1)
    if dtype != torch.float32:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    peft_model.save_pretrained(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_folder)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def load_peft_model(base_folder: Path, adapter_folder: Path):
    """The reference: transformers + peft loading the adapter from disk, as a user would."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base_model(base_folder), adapter_folder).eval()
