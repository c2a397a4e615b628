"""The per-step EDoRA arithmetic, written for few kernel launches.

A 7B model has 224 adapted layers, so each small op in an adapter's forward/backward is paid ~224 times per
micro-step; profiled on an H100, a plain autograd version spent most of its step launching kernels (GPU busy ~30%).
Here the detached norm runs without autograd in 5 fused ops, and the magnitude / low-rank combination is one
autograd node with a hand-written backward (checked with gradcheck in tests/test_edora_ops.py).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def factored_row_norm(w2: torch.Tensor, p: torch.Tensor, g: torch.Tensor, br: torch.Tensor, s: float) -> torch.Tensor:
    """n_i = ||(W0 + s·B R A)[i, :]|| from w2 = ||W0_i||², P = W0 Aᵀ, G = A Aᵀ and BR = B R (fp32, detached):

    n_i² = w2_i + Σ_j BR_ij · (2s·P + s²·BR G)_ij
    """
    t = torch.addmm(p, br, g, beta=2.0 * s, alpha=s * s)
    n2 = torch.linalg.vecdot(br, t, dim=1).add_(w2)
    # rounding can push n2 a hair below 0 only for all-zero rows; clamp so sqrt stays finite
    return n2.clamp_min_(torch.finfo(n2.dtype).tiny).sqrt_()


class MagnitudeLowRank(torch.autograd.Function):
    """y = (m / n) ⊙ (base + s · xa @ BRᵀ) on 2-D inputs, n detached.

    base `[T, out]` and xa `[T, r]` in the compute dtype; BR `[out, r]`, m `[out]`, n `[out]` in fp32.
    Saves pre = base + s·xa BRᵀ (the only activation-sized tensor), as autograd would save base_out.
    """

    @staticmethod
    def forward(ctx, base, xa, br, m, n, s):
        cdt = base.dtype
        with torch.autocast(device_type=base.device.type, enabled=False):
            scale = m / n
            br_c = br.to(cdt)
            scale_c = scale.to(cdt)
            pre = torch.addmm(base, xa, br_c.T, alpha=s)
            y = pre * scale_c
        ctx.save_for_backward(pre, xa, br_c, scale_c, n)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, gy):
        pre, xa, br_c, scale_c, n = ctx.saved_tensors
        s = ctx.s
        g_pre = gy * scale_c
        # the magnitude gradient sums over tokens; accumulate in fp32 whatever the compute dtype
        g_scale = (gy * pre).sum(0, dtype=torch.float32) if ctx.needs_input_grad[3] else None
        g_m = g_scale / n if g_scale is not None else None
        g_xa = torch.mm(g_pre, br_c) if ctx.needs_input_grad[1] else None
        g_br = torch.mm(g_pre.T, xa).float() if ctx.needs_input_grad[2] else None
        if s != 1.0:
            g_xa = g_xa * s if g_xa is not None else None
            g_br = g_br * s if g_br is not None else None
        return g_pre, g_xa, g_br, g_m, None, None
