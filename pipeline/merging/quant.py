"""The 4-bit round trip: what a base weight becomes when transformers loads it with BitsAndBytesConfig(load_in_4bit).

transformers casts the checkpoint tensor to the load dtype, then `bnb.nn.Params4bit` calls
`bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=<double quant>, quant_type=...)`; EDoRA saw
`dequantize_4bit` of that (in the load dtype), cast to fp32. Doing the same here gives bit-identical W0.
"""

from __future__ import annotations

import torch

from pipeline.adapter_meta import QuantInfo


def dequantized_4bit(w: torch.Tensor, q: QuantInfo) -> torch.Tensor:
    import bitsandbytes.functional as bf

    w = w.to(getattr(torch, q.base_dtype)).contiguous()
    packed, state = bf.quantize_4bit(w, blocksize=q.blocksize, compress_statistics=q.double_quant,
                                     quant_type=q.quant_type, quant_storage=getattr(torch, q.quant_storage))
    return bf.dequantize_4bit(packed, state).to(torch.float32)

