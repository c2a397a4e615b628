"""EDoRA's derived terms as pure functions, one definition each (fp32 by default; the merge's fingerprint check
redoes G, P and the row norms in fp64; its formula check of the written weights is written out on purpose).

Used by the layer (init, ZeRO-3 broadcast, reload), the layer's merge/unmerge and the streamed merge of
`pipeline merge`. The per-step row norm from these terms is `ops.factored_row_norm`.
"""

from __future__ import annotations

from typing import Optional

import torch


def _f32(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return t.to(device=device, dtype=dtype)


def gram(a: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G = A Aᵀ `[r, r]`."""
    a = a.to(dtype)
    return a @ a.T


def projection(w0: torch.Tensor, a: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """P = W0 Aᵀ `[out, r]` (on W0's device)."""
    return w0.to(dtype) @ _f32(a, w0.device, dtype).T


def row_norm2(w0: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """||W0_i||² per output row `[out]`."""
    w0 = w0.to(dtype)
    return (w0 * w0).sum(dim=1)


def fingerprint_deviation(saved_norm2: torch.Tensor, base_norm2: torch.Tensor) -> float:
    """Median over rows of | ||W0_i|| - saved_i | / saved_i: how far a base is from the one the adapter was made on."""
    saved = _f32(saved_norm2, base_norm2.device).sqrt()
    return ((base_norm2.to(torch.float32).sqrt() - saved).abs() / saved.clamp_min(1e-12)).median().item()


@torch.no_grad()
def merged_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, m: Optional[torch.Tensor],
                  s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', n): W' = (m / n) ⊙_row (W0 + s·B R A) with n the direct row norm (m None: LoRA-XS, n = 1)."""
    w0 = w0.to(torch.float32)
    dev = w0.device
    w = w0 + s * ((_f32(b, dev) @ _f32(r, dev)) @ _f32(a, dev))
    if m is None:
        return w, torch.ones(w.shape[0], device=dev)
    n = w.norm(dim=1)
    return w * (_f32(m, dev) / n)[:, None], n


@torch.no_grad()
def base_from_merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, m: Optional[torch.Tensor],
                     n: torch.Tensor, s: float) -> torch.Tensor:
    """The inverse of `merged_weight`: W0 = (n / m) ⊙_row W' - s·B R A, given the n the merge used."""
    w = w.to(torch.float32)
    dev = w.device
    if m is not None:
        w = w * (_f32(n, dev) / _f32(m, dev))[:, None]
    return w - s * ((_f32(b, dev) @ _f32(r, dev)) @ _f32(a, dev))
