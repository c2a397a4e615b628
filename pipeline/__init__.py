"""EDoRA instruction-tuning pipeline: train (TRL + EDoRA), merge, serve (vLLM), eval (GSM8K / MATH)."""

__version__ = "0.1.0"
