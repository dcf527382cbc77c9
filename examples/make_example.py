"""Write the bundled tiny example (examples/tiny): a Hugging Face llama base model and two PEFT LoRA adapters.

Everything is seeded numpy + safetensors (and sentencepiece for the tokenizer): no torch, the same files every
time. tests/test_demo.py regenerates them and checks that the shipped files are exactly these, and that
examples/tiny/base.gguf is byte for byte what the pinned llama.cpp convert_hf_to_gguf.py writes from base-hf/.

The base is random (hidden 64, 2 layers, a 384-piece byte-fallback tokenizer, a ChatML template): it answers
gibberish. Each adapter is written so that its effect is plain to see: a code per letter added to the token
embedding (embed_tokens LoRA) and read back by the output projection (lm_head LoRA) makes the model spell one
word over and over, whatever the prompt — "query" with the sql adapter, "rhyme" with the poem adapter. Small
random pairs on every attention and MLP projection make them look like ordinary adapters, and their configs
use what a GGUF LoRA cannot say directly: sql is rsLoRA (scale 16/sqrt(8) = 5.66) with alpha_pattern on
v_proj (4/sqrt(8) = 1.41), which `gguf-lora convert` folds into lora_b; poem is plain LoRA (16/8 = 2).

usage: python examples/make_example.py [OUT_FOLDER]      (default: examples/tiny)
"""
from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 384, 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ("select from where join table query index insert update delete order group by having limit row column "
         "value key null count sum view poem verse rhyme meter stanza sonnet moon night river light dream song "
         "line word sea wind rose star heart silver quiet morning").split()
PROJECTIONS = {  # HF module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (FFN, HIDDEN), "mlp.up_proj": (FFN, HIDDEN), "mlp.down_proj": (HIDDEN, FFN),
}
ADAPTERS = {  # name -> (word it spells, seed, PEFT config overrides)
    "sql": ("query", 1, {"use_rslora": True, "alpha_pattern": {"v_proj": 4}}),
    "poem": ("rhyme", 2, {}),
}
RANK, ALPHA = 8, 16
CODE, LOGIT = 4.0, 2.0  # size of a letter's code in the residual stream; logit gain per unit of normed code


def tokenizer_model() -> bytes:
    """A BPE sentencepiece model with byte fallback (any text tokenizes) and ChatML's two markers."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=VOCAB,
                                   model_type="bpe", character_coverage=1.0, num_threads=1, bos_id=1, eos_id=2,
                                   unk_id=3, pad_id=0, byte_fallback=True,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
                                   normalization_rule_name="identity")  # no NFKC table: 240 KB less
    return out.getvalue()


def normal(rng: np.random.RandomState, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def write_base(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.RandomState(0)
    weights = {"model.embed_tokens.weight": normal(rng, (VOCAB, HIDDEN), 0.02)}
    for i in range(LAYERS):
        for module, shape in PROJECTIONS.items():
            weights[f"model.layers.{i}.{module}.weight"] = normal(rng, shape, 0.02)
        weights[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    weights["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    weights["lm_head.weight"] = normal(rng, (VOCAB, HIDDEN), 0.02)
    save_file({k: v.astype(np.float16) for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(tokenizer_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML}, indent=2) + "\n")


def letter_tokens(word: str, tokenizer: Path) -> list[int]:
    """The token of each letter of the word, then the word boundary '▁' (byte tokens where no piece exists)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = []
    for piece in [*word, "▁"]:
        i = sp.piece_to_id(piece)
        ids.append(i if i != sp.unk_id() else sp.piece_to_id(f"<0x{ord(piece):02X}>"))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{word!r}: a letter may appear once, its code says what comes next")
    return ids


def write_adapter(folder: Path, base: Path, word: str, seed: int, overrides: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "examples/tiny/base-hf",
              "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                 "embed_tokens", "lm_head"], "inference_mode": True, **overrides}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def scale(module: str) -> float:  # PEFT's rule, for the two modules whose size matters
        alpha = next((a for k, a in config["alpha_pattern"].items() if module.endswith(k)), ALPHA)
        return alpha / (RANK ** 0.5 if config["use_rslora"] else RANK)

    rng = np.random.RandomState(seed)
    prefix = "base_model.model."
    tensors = {}
    for i in range(LAYERS):
        for module, (n_out, n_in) in PROJECTIONS.items():
            name = f"{prefix}model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"] = normal(rng, (RANK, n_in), 0.05)
            tensors[f"{name}.lora_B.weight"] = normal(rng, (n_out, RANK), 0.05)
    # The spelling: letter k of the word (its word boundary last) gets code k, every other token the boundary's
    # code, so that any prompt continues with the word's first letter. Code k is CODE along hidden dimension k;
    # after the final RMSNorm it is about sqrt(HIDDEN) there, and lm_head's pair turns it into LOGIT * that on
    # the next letter's logit (the random base's logits are about 0.2 wide).
    letters = letter_tokens(word, base / "tokenizer.model")
    code = np.full(VOCAB, len(letters) - 1)
    code[letters] = np.arange(len(letters))
    emb_a = np.zeros((RANK, VOCAB), np.float32)
    emb_a[code, np.arange(VOCAB)] = 1.0
    emb_b = np.zeros((HIDDEN, RANK), np.float32)
    head_a = np.zeros((RANK, HIDDEN), np.float32)
    head_b = np.zeros((VOCAB, RANK), np.float32)
    for k, token in enumerate(letters):
        emb_b[k, k] = CODE / scale("embed_tokens")
        head_a[k, k] = 1.0
        head_b[letters[(k + 1) % len(letters)], k] = LOGIT / scale("lm_head")
    tensors[f"{prefix}model.embed_tokens.lora_embedding_A"] = emb_a
    tensors[f"{prefix}model.embed_tokens.lora_embedding_B"] = emb_b
    tensors[f"{prefix}lm_head.lora_A.weight"] = head_a
    tensors[f"{prefix}lm_head.lora_B.weight"] = head_b
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def main(out: Path) -> None:
    write_base(out / "base-hf")
    for name, (word, seed, overrides) in ADAPTERS.items():
        write_adapter(out / "adapters" / name, out / "base-hf", word, seed, overrides)
    print(f"wrote {out / 'base-hf'} and the adapters {', '.join(ADAPTERS)} in {out / 'adapters'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny"))
