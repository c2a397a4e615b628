"""Loading models and tokenizers from a hub id, a local directory or a single GGUF file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "auto": "auto"}


@dataclass
class ModelSource:
    """Where a model comes from: `from_pretrained(path, gguf_file=gguf_file)`."""

    path: str
    gguf_file: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSource:
        p = Path(spec)
        if p.suffix == ".gguf":
            if not p.is_file():
                raise FileNotFoundError(f"GGUF file {spec} does not exist")
            return cls(path=str(p.parent), gguf_file=p.name)
        return cls(path=spec)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    value = DTYPES[name]
    return value if value == "auto" else getattr(torch, value)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    src = ModelSource.parse(spec)
    tok = AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    if tok.pad_token is None:
        # Llama/Mistral tokenizers have no pad token; reuse EOS (masked out of the loss by attention_mask).
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "bfloat16", attn_implementation: str | None = None,
               quantization_config=None, device_map=None, **extra):
    """Load a causal LM. `spec` is a hub id, a local dir or a `.gguf` file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    src = ModelSource.parse(spec)
    kwargs = dict(src.kwargs(), dtype=torch_dtype(dtype), **extra)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading model %s (%s)", spec, dtype)
    model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    if src.gguf_file:
        # transformers dequantizes GGUF weights into plain tensors at load but keeps a GGUF "quantizer" marker,
        # which makes the Trainer refuse to train and save_pretrained refuse to save. The weights are ordinary.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
    return model
