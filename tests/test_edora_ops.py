"""The hand-written backward of the fused EDoRA op, checked by finite differences and against dense autograd."""

import pytest
import torch
from helpers import reference_weight
from peft import get_peft_model
from torch import nn

from pipeline.edora import EdoraConfig
from pipeline.edora.ops import EdoraLinearAdapter, MagnitudeLowRank


def test_gradcheck_magnitude_low_rank():
    g = torch.Generator().manual_seed(0)
    T, out_f, r = 5, 7, 3
    base = torch.randn(T, out_f, generator=g, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(T, r, generator=g, dtype=torch.float64, requires_grad=True)
    br = torch.randn(out_f, r, generator=g, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(out_f, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    n = torch.rand(out_f, generator=g, dtype=torch.float64) + 0.5
    for s in (1.0, 2.5):
        assert torch.autograd.gradcheck(lambda *a, s=s: MagnitudeLowRank.apply(*a, n, s), (base, xa, br, m))


@pytest.mark.parametrize("bias", [True, False])  # False: the fused hot path
def test_layer_gradients_equal_dense_autograd_with_detached_norm(bias):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 24, bias=bias))
    w0 = lin[0].weight.detach().clone()
    b = lin[0].bias.detach().clone() if bias else 0.0
    model = get_peft_model(lin, EdoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.1)
    x = torch.randn(3, 6, 32, requires_grad=True)
    target = torch.randn(3, 6, 24)
    ((layer(x) - target) ** 2).mean().backward()

    # reference: the dense formula with autograd, n detached (DoRA §4.3)
    A, B = layer.edora_A["default"], layer.edora_B["default"]
    R = layer.edora_R["default"].detach().clone().requires_grad_()
    m = layer.edora_magnitude["default"].detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ reference_weight(w0, A, B, R, m, 2.0, detach_norm=True).T + b
    ((y - target) ** 2).mean().backward()
    torch.testing.assert_close(layer.edora_R["default"].grad, R.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.edora_magnitude["default"].grad, m.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-7)


def test_cpu_bf16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 48)), EdoraConfig(r=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.05)
    x = torch.randn(4, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.edora_magnitude["default"].grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_gradcheck_fused_adapter_and_zero_rows():
    g = torch.Generator().manual_seed(1)
    T, in_f, out_f, r = 4, 6, 5, 3
    d = torch.float64
    x = torch.randn(T, in_f, generator=g, dtype=d, requires_grad=True)
    base = torch.randn(T, out_f, generator=g, dtype=d, requires_grad=True)
    a = torch.randn(r, in_f, generator=g, dtype=d)
    b = torch.randn(out_f, r, generator=g, dtype=d)
    w0 = torch.randn(out_f, in_f, generator=g, dtype=d)
    r_mat = (0.1 * torch.randn(r, r, generator=g, dtype=d)).requires_grad_()
    m = (torch.rand(out_f, generator=g, dtype=d) + 0.5).requires_grad_()
    w2, p, gm = (w0 * w0).sum(1), w0 @ a.T, a @ a.T
    for s in (1.0, 0.5):
        def fn(x, base, r_mat, m, s=s):
            return EdoraLinearAdapter.apply(x, base, a, b, r_mat, m, w2, p, gm, s)

        # x, base, m: n does not depend on them, so finite differences check the backward exactly
        assert torch.autograd.gradcheck(lambda x, base, m: fn(x, base, r_mat, m), (x, base, m))
        # forward = the dense formula with the direct row norm; R's gradient = dense autograd with n detached
        r_ref = r_mat.detach().clone().requires_grad_()
        w = w0 + s * b @ r_ref @ a
        n = torch.linalg.vector_norm(w, dim=1).detach()
        expected = (m.detach() / n) * (base.detach() + s * x.detach() @ a.T @ r_ref.T @ b.T)
        got = fn(x, base, r_mat, m)
        torch.testing.assert_close(got.detach(), expected)
        cot = torch.randn(T, out_f, generator=g, dtype=d)
        (g_r,) = torch.autograd.grad(got, r_mat, cot)
        (g_ref,) = torch.autograd.grad(expected, r_ref, cot)
        torch.testing.assert_close(g_r, g_ref)


def test_all_zero_weight_row_stays_finite():
    lin = nn.Sequential(nn.Linear(8, 6, bias=False))
    with torch.no_grad():
        lin[0].weight[2].zero_()
    model = get_peft_model(lin, EdoraConfig(r=2, target_modules=["0"], init_sigma=0.0))
    x = torch.randn(3, 8)
    y = model(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x @ model.base_model.model[0].get_base_layer().weight.T)  # R = 0: the base


def test_gradcheck_fast_path_ops():
    """The training fast path's hand-written backwards (EdoraApply with the base output or with W0 inside, and the
    batched EdoraStepTerms) against finite differences in float64."""
    from pipeline.edora.ops import EdoraApply, EdoraStepTerms

    g = torch.Generator().manual_seed(0)
    T, in_f, out_f, r, L = 5, 6, 7, 3, 2

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x, base, a, br, scale = rnd(T, in_f), rnd(T, out_f), rnd(r, in_f, grad=False), rnd(out_f, r), rnd(out_f)
    w0 = rnd(out_f, in_f, grad=False)
    assert torch.autograd.gradcheck(lambda x, base, br, scale: EdoraApply.apply(x, base, None, a, br, scale,
                                                                                scale.detach()), (x, base, br, scale))
    assert torch.autograd.gradcheck(lambda x, br, scale: EdoraApply.apply(x, None, w0, a, br, scale, scale.detach()),
                                    (x, br, scale))
    # with W0 inside, the result is the same as handing over base = x W0ᵀ
    torch.testing.assert_close(EdoraApply.apply(x, None, w0, a, br, scale, scale.detach()),
                               EdoraApply.apply(x, x @ w0.T, None, a, br, scale, scale.detach()))

    b = torch.linalg.qr(torch.randn(L, out_f, r, generator=g, dtype=torch.float64)).Q
    a3 = torch.randn(L, r, in_f, generator=g, dtype=torch.float64)
    w = torch.randn(L, out_f, in_f, generator=g, dtype=torch.float64)
    p, gg, w2 = w @ a3.transpose(1, 2), a3 @ a3.transpose(1, 2), (w * w).sum(-1)
    R, m = rnd(L, r, r), (torch.rand(L, out_f, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    for s in (1.0, 2.0):
        # n is detached by design, so finite differences see m / n(R) with n varying; check dR and dm against
        # dense autograd with n detached instead
        br_s, sc, _ = EdoraStepTerms.apply(R, m, b, p, gg, w2, s, torch.float64, [True])
        (br_s.sin().sum() + (sc * torch.arange(out_f)).sum()).backward()
        R2, m2 = R.detach().clone().requires_grad_(), m.detach().clone().requires_grad_()
        n = torch.linalg.vector_norm(w + s * b @ R2.detach() @ a3, dim=-1)
        ((s * b @ R2).sin().sum() + ((m2 / n) * torch.arange(out_f)).sum()).backward()
        torch.testing.assert_close(R.grad, R2.grad)
        torch.testing.assert_close(m.grad, m2.grad)
        R.grad = m.grad = None
