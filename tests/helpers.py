"""Tiny models built from config for tests: no downloads, seconds on a CPU."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, vocab: int = 128, hidden: int = 64,
               intermediate: int = 96, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model
