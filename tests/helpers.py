"""Tiny models built from config for tests: no downloads, seconds on a CPU."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, vocab: int = 128, hidden: int = 64,
               intermediate: int = 96, heads: int = 4, kv_heads: int = 2, max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def tiny_tokenizer(save_dir=None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a fraction of a second on a few math sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction: ### Response: Let's think step by step. The answer is: 42",
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. 0123456789 +-*/=$%.,",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def quantize_linears_nf4(model, targets=ALL_LINEAR, device="cuda") -> None:
    """Swap a Llama/Mistral decoder's projections for bitsandbytes NF4 Linear4bit (bf16 compute) on `device`."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True
