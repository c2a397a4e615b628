"""FLOPs of one training micro-batch of a frozen-base adapter fine-tune of a Llama/Mistral decoder, for MFU.

Counted (multiply-add = 2 FLOPs), with d = hidden (= heads x head dim), kv = key/value width, f = MLP width,
V = vocabulary, L = layers, N = L * (2 d^2 + 2 d kv + 3 d f) + d V the matmul parameters a token passes through
(the embedding lookup: none):
  forward             2 N per token + attention 2 d L s (s + 1) per row of s tokens (causal: QK^T and AV over the
                      s (s + 1) / 2 query-key pairs)
  backward            2 N per token (input gradients only: the base weights are frozen, so no weight gradients)
                      + attention 4 d L s (s + 1) per row (dQ, dK, dV, dP: twice the forward)
  recompute           with gradient checkpointing, one more forward of the checkpointed layers: their share of
                      2 (N - d V) per token plus their attention forward
Model FLOPs (MFU) = forward + backward; hardware FLOPs (HFU) add the recompute. Only real tokens count (padding and,
under padding-free sdpa, the masked cross-example blocks are work the hardware does that the model does not need).
The adapters' own FLOPs (rank 64: ~1-2% of a projection's) are not counted, so every method is held to the same
work per token and the MFU ratio of two methods is their tokens/s ratio.
"""

from __future__ import annotations

import math

FORMULA = __doc__.split("\n\n", 1)[1].strip()
# NVIDIA H200 SXM (= H100 SXM): 989.4 TFLOP/s dense BF16 tensor core, the data-sheet figure (1,979 with sparsity)
H200_BF16_DENSE_TFLOPS = 989.4


def shape(config) -> dict:
    """The sizes the formula needs, from a transformers Llama/Mistral config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"d": config.hidden_size, "kv": config.num_key_value_heads * head_dim, "q": heads * head_dim,
            "f": config.intermediate_size, "V": config.vocab_size, "L": config.num_hidden_layers}


def matmul_params(s: dict) -> tuple[int, int]:
    """(decoder-layer matmul parameters of all layers, LM-head parameters)."""
    per_layer = 2 * s["d"] * s["q"] + 2 * s["d"] * s["kv"] + 3 * s["d"] * s["f"]
    return s["L"] * per_layer, s["d"] * s["V"]


def checkpointed_layers(layers: int, checkpointing: bool, every_n: int = 1) -> int:
    """Layers whose forward is recomputed: all with checkpointing, every n-th with every_n_layers = n."""
    return math.ceil(layers / every_n) if checkpointing else 0


def micro_batch_flops(s: dict, row_lengths: list[int], recomputed_layers: int) -> dict:
    """Model and hardware FLOPs of one micro-batch whose real rows have these lengths."""
    layers_n, head_n = matmul_params(s)
    tokens = sum(row_lengths)
    pairs = sum(n * (n + 1) for n in row_lengths)  # 2 x the causal query-key pairs
    attn_fwd = 2 * s["q"] * pairs * s["L"]
    model = 4 * (layers_n + head_n) * tokens + 3 * attn_fwd
    share = recomputed_layers / s["L"]
    recompute = share * (2 * layers_n * tokens + attn_fwd)
    return {"model": model, "hardware": model + recompute, "tokens": tokens}


def per_token(s: dict, row_length: int, recomputed_layers: int) -> dict:
    """Model and hardware FLOPs per token for rows of one length (the figures the report states)."""
    f = micro_batch_flops(s, [row_length], recomputed_layers)
    return {"model": f["model"] / row_length, "hardware": f["hardware"] / row_length}
