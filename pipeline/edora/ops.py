"""The per-step EDoRA arithmetic, written for few kernel launches.

A 7B model has 224 adapted layers, so each small op in an adapter's forward/backward is paid ~224 times per
micro-step; profiled on an H100, a plain autograd version spent most of its step launching kernels (GPU busy ~30%).
Here the detached norm runs without autograd in 5 fused ops, and the magnitude / low-rank combination is one
autograd node with a hand-written backward (checked with gradcheck in tests/test_edora_ops.py).

Training takes a faster route (step_terms.py): `EdoraStepTerms` computes the parameter-side terms of all layers of
one shape at once, and `EdoraApply` is what is left per layer (also inside a torch.compile'd graph).
`EdoraLinearAdapter` (per layer) serves eval, ZeRO-3 and reentrant checkpointing.
"""

from __future__ import annotations

import contextlib

import torch


def no_autocast(device: torch.device):
    """Autocast off for the adapter arithmetic, which picks its dtypes itself (the norm terms and B R in fp32 keep n
    exact under bf16 autocast). Entering a context costs host time, so only when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def factored_row_norm(w2: torch.Tensor, p: torch.Tensor, g: torch.Tensor, br: torch.Tensor, s: float) -> torch.Tensor:
    """n_i = ||(W0 + s·B R A)[i, :]|| from w2 = ||W0_i||², P = W0 Aᵀ, G = A Aᵀ and BR = B R (fp32, detached):

    n_i² = w2_i + Σ_j BR_ij · (2s·P + s²·BR G)_ij

    The layers store w2 clamped above 0, so n > 0 even for an all-zero weight row.
    Also batched: w2 `[L, out]`, p and br `[L, out, r]`, g `[L, r, r]`.
    """
    if br.dim() == 3:
        t = torch.baddbmm(p, br, g, beta=2.0 * s, alpha=s * s)
    else:
        t = torch.addmm(p, br, g, beta=2.0 * s, alpha=s * s)
    return torch.linalg.vecdot(br, t, dim=-1).add_(w2).sqrt_()


class MagnitudeLowRank(torch.autograd.Function):
    """y = (m / n) ⊙ (base + s · xa @ BRᵀ) on 2-D inputs, n detached.

    base `[T, out]` and xa `[T, r]` in the compute dtype; BR `[out, r]`, m `[out]`, n `[out]` in fp32.
    Saves pre = base + s·xa BRᵀ (the only activation-sized tensor), as autograd would save base_out.
    """

    @staticmethod
    def forward(ctx, base, xa, br, m, n, s):
        cdt = base.dtype
        with no_autocast(base.device):
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


class EdoraLinearAdapter(torch.autograd.Function):
    """The whole EDoRA adapter path of one layer as one autograd node (the hot path: no dropout, magnitude on):

        BR = B R;  n = sqrt(w2 + Σ_j BR_ij (2s·P + s²·BR G)_ij)  (detached);  scale = m / n
        y  = scale ⊙ (base + s · (x Aᵀ) BRᵀ)

    x `[T, in]`, base `[T, out]`, a_c `[r, in]` in the compute dtype; b `[out, r]`, r_mat `[r, r]`, m `[out]`,
    w2 `[out]` (> 0), p `[out, r]`, g `[r, r]` in fp32. Gradients flow to x, base, r_mat and m only.
    """

    @staticmethod
    def forward(ctx, x, base, a_c, b, r_mat, m, w2, p, g, s):
        cdt = base.dtype
        with no_autocast(base.device):
            xa = torch.mm(x, a_c.T)
            br = torch.mm(b, r_mat)
            # m / sqrt(..), not m * rsqrt(..): with R = 0 this is exactly m / sqrt(w2) = 1, so W' = W0 bit for bit
            n = factored_row_norm(w2, p, g, br, s)
            scale_c = (m / n).to(cdt)
            br_c = br.to(cdt)
            pre = torch.addmm(base, xa, br_c.T, alpha=s)
            y = pre * scale_c
        ctx.save_for_backward(xa, a_c, b, br_c, pre, scale_c, n)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, gy):
        xa, a_c, b, br_c, pre, scale_c, n = ctx.saved_tensors
        s = ctx.s
        g_pre = gy * scale_c
        # sums over tokens accumulate in the adapter dtype (fp32), whatever the compute dtype
        g_m = (gy * pre).sum(0, dtype=n.dtype).div_(n) if ctx.needs_input_grad[5] else None
        g_x = g_r = None
        if ctx.needs_input_grad[0]:
            g_xa = torch.mm(g_pre, br_c)
            g_x = torch.mm(g_xa, a_c) if s == 1.0 else torch.mm(g_xa, a_c).mul_(s)
        if ctx.needs_input_grad[4]:
            g_br = torch.mm(g_pre.T, xa).to(b.dtype)
            g_r = torch.mm(b.T, g_br) if s == 1.0 else torch.mm(b.T, g_br).mul_(s)
        return g_x, g_pre, None, None, g_r, g_m, None, None, None, None


class EdoraStepTerms(torch.autograd.Function):
    """The parameter-side terms of L layers of the same shape, batched (the training fast path, see step_terms.py):

        BR_s = s · B R  (compute dtype),   scale = m / n  (fp32; n detached),   scale_c = scale in the compute dtype

    r `[L, r, r]`, m `[L, out]`, b and p `[L, out, r]`, g `[L, r, r]`, w2 `[L, out]`, all fp32. Gradients flow to r
    and m: dR = s · Bᵀ dBR_s and dm = dscale / n.
    """

    @staticmethod
    def forward(ctx, r, m, b, p, g, w2, s, cdt, live):
        with no_autocast(r.device):
            br = torch.bmm(b, r)
            n = factored_row_norm(w2, p, g, br, s)
            scale = m / n  # m / sqrt(..): exactly 1 at R = 0, as in the per-layer op
            br_s = br.mul_(s).to(cdt) if s != 1.0 else br.to(cdt)
            # a distinct tensor even when cdt is fp32: one tensor returned twice would share its gradient
            scale_c = scale.to(cdt) if cdt != scale.dtype else scale.detach()
        ctx.mark_non_differentiable(scale_c)
        ctx.save_for_backward(b, n)
        ctx.s, ctx.live = s, live
        return br_s, scale, scale_c

    @staticmethod
    def backward(ctx, g_br_s, g_scale, _):
        b, n = ctx.saved_tensors
        ctx.live[0] = False  # this pass's terms are spent: a later forward must not reuse them
        g_r = torch.bmm(b.transpose(1, 2), g_br_s.to(b.dtype))
        if ctx.s != 1.0:
            g_r.mul_(ctx.s)
        return g_r, g_scale / n, None, None, None, None, None, None, None


class EdoraApply(torch.autograd.Function):
    """One layer's share of the fast path: y = scale ⊙ (base + (x Aᵀ) BR_sᵀ), with BR_s and scale from
    EdoraStepTerms. 3 kernels forward, 6 backward. `scale` (fp32) only carries the gradient of m; `scale_c` (compute
    dtype, no gradient) is what multiplies. Gradients flow to x, base, br_s and scale.

    Give either `base` (the base layer's output, e.g. from a 4-bit matmul) or `w0` (a plain bias-free Linear's
    weight, no gradient): with w0 the base matmul runs inside this node, which saves the base's own autograd node and
    the sum of the two input gradients (dx = dpre W0 + (dpre BR_s) A is one addmm).
    """

    @staticmethod
    def forward(ctx, x, base, w0, a_c, br_s, scale, scale_c):
        with no_autocast(x.device):
            xa = torch.mm(x, a_c.T)
            if w0 is None:
                pre = torch.addmm(base, xa, br_s.T)
            else:
                pre = torch.mm(x, w0.T).addmm_(xa, br_s.T)
            y = pre * scale_c
        ctx.save_for_backward(xa, w0, a_c, br_s, pre, scale_c)
        return y

    @staticmethod
    def backward(ctx, gy):
        xa, w0, a_c, br_s, pre, scale_c = ctx.saved_tensors
        g_pre = gy * scale_c
        # the sum over tokens accumulates in fp32 whatever the compute dtype, as in the per-layer op
        g_scale = (gy * pre).sum(0, dtype=torch.float32) if ctx.needs_input_grad[5] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            g_x = torch.mm(torch.mm(g_pre, br_s), a_c)
            if w0 is not None:
                g_x.addmm_(g_pre, w0)
        g_br = torch.mm(g_pre.T, xa) if ctx.needs_input_grad[4] else None
        return g_x, (g_pre if w0 is None else None), None, None, g_br, g_scale, None
