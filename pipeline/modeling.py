"""Loading models and tokenizers from a hub id, a local directory or a single GGUF file."""

from __future__ import annotations

import logging

from pipeline.dtypes import torch_dtype
from pipeline.specs import ModelSpec

logger = logging.getLogger(__name__)

def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path, src_kwargs = ModelSpec.parse(spec).from_pretrained_args()
    tok = AutoTokenizer.from_pretrained(path, **src_kwargs)
    if tok.pad_token is None:
        # Llama/Mistral tokenizers have no pad token; reuse EOS (masked out of the loss by attention_mask).
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "bfloat16", attn_implementation: str | None = None,
               quantization_config=None, device_map=None, **extra):
    """Load a causal LM. `spec` is a hub id, a local dir or a `.gguf` file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    path, src_kwargs = ModelSpec.parse(spec).from_pretrained_args()
    kwargs = dict(src_kwargs, dtype=torch_dtype(dtype), **extra)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading model %s (%s)", spec, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "gguf_file" in src_kwargs:
        # transformers dequantizes GGUF weights into plain tensors at load but keeps a GGUF "quantizer" marker,
        # which makes the Trainer refuse to train and save_pretrained refuse to save. The weights are ordinary.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
    return model
