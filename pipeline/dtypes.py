"""The float dtypes the pipeline names (recipes, flags, configs), in one table with an explicit precision order."""

from __future__ import annotations

# Lowest precision first (significand bits: bfloat16 8, float16 11, float32 24); flags list them in this order.
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def lower_precision(a: str, b: str) -> str:
    """The less precise of two dtype names: the one whose rounding bounds a comparison of results in both."""
    return a if FLOAT_DTYPES.index(a) < FLOAT_DTYPES.index(b) else b


def torch_dtype(name: str):
    """The torch dtype for a name or an alias (bf16, fp16, fp32); "auto" stays "auto" (transformers' choice)."""
    if name == "auto":
        return "auto"
    value = ALIASES.get(name, name)
    if value not in FLOAT_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted([*FLOAT_DTYPES, *ALIASES, 'auto'])}")
    import torch

    return getattr(torch, value)
