"""Truncated SVD of a weight matrix, exact or randomized, always deterministic.

The randomized variant (Halko, Martinsson & Tropp 2011) draws its test matrix from an explicit generator, so every
rank of a distributed run computes the same factors from the same weight: A and B are buffers that ZeRO-3 does not
broadcast, so they must agree everywhere by construction.
"""

from __future__ import annotations

import torch


def truncated_svd(w: torch.Tensor, r: int, method: str = "randomized", niter: int = 4, oversample: int = 16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of `w` (fp32, [out, in]): U `[out, r]`, S `[r]` (descending), Vh `[r, in]`."""
    if w.dtype != torch.float32:
        raise TypeError(f"truncated_svd expects float32, got {w.dtype}")
    out_f, in_f = w.shape
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    if method != "randomized":
        raise ValueError(f"unknown svd method {method!r}")
    q = min(r + oversample, out_f, in_f)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    # Work on the smaller side: range finder of w (tall) or of wᵀ (wide).
    mat = w if out_f >= in_f else w.T
    omega = torch.randn(mat.shape[1], q, generator=gen, device=w.device, dtype=w.dtype)
    basis = torch.linalg.qr(mat @ omega).Q
    for _ in range(niter):  # power iterations, re-orthonormalised each half step for stability
        basis = torch.linalg.qr(mat.T @ basis).Q
        basis = torch.linalg.qr(mat @ basis).Q
    small = basis.T @ mat  # [q, cols]
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ u_small
    if mat is not w:  # svd(wᵀ) = V S Uᵀ
        u, vh = vh.T, u.T
    return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
