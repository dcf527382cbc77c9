"""Write a tiny llama-shaped base model (Hugging Face folder) and a PEFT LoRA adapter trained on nothing,
so that `gguf-lora convert` has something real to work on. Seeded: the same files every time.

usage: python examples/make_example.py OUT_FOLDER
"""
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main(out: Path) -> None:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(out / "base")
    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                      alpha_pattern={"v_proj": 4}, init_lora_weights=False)
    adapter = get_peft_model(base, lora)
    adapter.save_pretrained(out / "adapter")
    print(f"wrote {out / 'base'} and {out / 'adapter'} (rank 8, rsLoRA, alpha_pattern on v_proj)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/tiny"))
