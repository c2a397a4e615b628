"""EDoRA's math, checked against formulas written out here (not the module's own code)."""

import copy

import pytest
import torch
from helpers import ALL_LINEAR, reference_weight, tiny_llama
from peft import get_peft_model
from torch import nn

from pipeline.edora import EdoraConfig, Linear
from pipeline.edora.ops import factored_row_norm
from pipeline.edora.svd import truncated_svd


def edora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def randomize_adapter(model, r_std=0.05, m_std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in edora_layers(model).values():
            R = layer.edora_R["default"]
            R.copy_(torch.randn(R.shape, generator=g) * r_std)
            if "default" in layer.edora_magnitude:
                m = layer.edora_magnitude["default"]
                m.mul_(1 + m_std * torch.randn(m.shape, generator=g))


def test_tiny_llama_matches_independent_formula():
    base = tiny_llama(seed=0)
    frozen = copy.deepcopy(base)
    x = torch.randint(0, 128, (2, 9))
    model = get_peft_model(base, EdoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=0))
    randomize_adapter(model)
    layers = edora_layers(model)
    assert len(layers) == 2 * 7

    # 1) every layer: y = (m/n) ⊙ (x W0ᵀ + s x Aᵀ Rᵀ Bᵀ) + b, with n the direct row norm of W0 + sBRA
    g = torch.Generator().manual_seed(3)
    for name, layer in layers.items():
        w0 = layer.get_base_layer().weight.detach()
        A, B = layer.edora_A["default"], layer.edora_B["default"]
        R, m = layer.edora_R["default"].detach(), layer.edora_magnitude["default"].detach()
        s = 8 / 4
        n = torch.linalg.vector_norm(w0 + s * B @ R @ A, dim=1)
        xin = torch.randn(3, 5, layer.in_features, generator=g)
        expected = (m / n) * (xin @ w0.T + s * xin @ A.T @ R.T @ B.T)
        got = layer(xin).detach()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)

    # 2) the whole model: logits equal those of the base model with every weight replaced by W'
    for name, layer in layers.items():
        w0 = layer.get_base_layer().weight.detach()
        ref_w = reference_weight(w0, layer.edora_A["default"], layer.edora_B["default"],
                                 layer.edora_R["default"].detach(), layer.edora_magnitude["default"].detach(), 2.0)
        frozen.get_submodule(name.removeprefix("base_model.model.")).weight.data = ref_w
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, frozen(x).logits, rtol=1e-5, atol=1e-5)


def test_bias_and_3d_input_on_plain_linear():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(24, 40, bias=True))
    w0, b = lin[0].weight.detach().clone(), lin[0].bias.detach().clone()
    model = get_peft_model(lin, EdoraConfig(r=6, target_modules=["0"], svd_method="exact"))
    randomize_adapter(model)
    layer = edora_layers(model)["base_model.model.0"]
    A, B, R, m = (layer.edora_A["default"], layer.edora_B["default"], layer.edora_R["default"].detach(),
                  layer.edora_magnitude["default"].detach())
    x = torch.randn(2, 3, 24)
    expected = x @ reference_weight(w0, A, B, R, m, 1.0).T + b
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-5, atol=1e-6)


def test_zero_R_gives_exactly_the_base_logits():
    base = tiny_llama(seed=2)
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        ref = base(x).logits.clone()
    model = get_peft_model(base, EdoraConfig(r=8, target_modules=ALL_LINEAR, init_sigma=0.0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("svd_target", ["weight", "direction"])
def test_A_B_are_the_top_r_svd_factors(svd_target):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(48, 32, bias=False))
    w0 = lin[0].weight.detach().clone()
    r = 5
    model = get_peft_model(lin, EdoraConfig(r=r, target_modules=["0"], svd_method="exact", svd_target=svd_target))
    layer = edora_layers(model)["base_model.model.0"]
    A, B = layer.edora_A["default"], layer.edora_B["default"]
    target = w0 if svd_target == "weight" else w0 / torch.linalg.vector_norm(w0, dim=1, keepdim=True)
    sv = torch.linalg.svdvals(target.double())
    # B has orthonormal columns, and B A is the best rank-r approximation: residual = tail singular values
    torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
    resid = torch.linalg.matrix_norm(target.double() - (B @ A).double()) ** 2
    torch.testing.assert_close(resid, (sv[r:] ** 2).sum(), rtol=1e-4, atol=1e-8)
    # Σ folded into A: the row norms of A are the top singular values
    torch.testing.assert_close(torch.linalg.vector_norm(A.double(), dim=1), sv[:r], rtol=1e-5, atol=1e-7)
    # magnitude starts at the row norms of W0 in both variants
    torch.testing.assert_close(layer.edora_magnitude["default"].detach(), torch.linalg.vector_norm(w0, dim=1))


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum():
    # Pretrained weights have decaying spectra; the randomized SVD must come within 1% of the optimal residual.
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 512, 384, 32
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=g))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    sv = 1.0 / (1 + torch.arange(in_f, dtype=torch.float32)) ** 0.7
    w = (u[:, :in_f] * sv) @ v.T
    U, S, Vh = truncated_svd(w, r, "randomized", niter=4, oversample=16, seed=5)
    resid = torch.linalg.matrix_norm(w - (U * S) @ Vh) ** 2
    optimal = (sv[r:] ** 2).sum()
    assert resid <= optimal * 1.01, (resid, optimal)
    # deterministic given the seed: every rank of a distributed run gets the same factors
    U2, S2, Vh2 = truncated_svd(w, r, "randomized", niter=4, oversample=16, seed=5)
    assert torch.equal(U, U2) and torch.equal(Vh, Vh2)
    # wide matrices take the transposed path
    Uw, Sw, Vhw = truncated_svd(w.T.contiguous(), r, "randomized", seed=5)
    assert Uw.shape == (in_f, r) and Vhw.shape == (r, out_f)
    assert torch.linalg.matrix_norm(w.T - (Uw * Sw) @ Vhw) ** 2 <= optimal * 1.01


@pytest.mark.parametrize("shape", [(40, 24), (4096, 14336)])
def test_factored_norm_equals_direct_norm(shape):
    out_f, in_f = shape
    r, s = 64 if out_f > 100 else 6, 2.0
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(out_f, in_f, generator=g) * 0.02
    A = torch.randn(r, in_f, generator=g) * 0.1
    B = torch.linalg.qr(torch.randn(out_f, r, generator=g)).Q
    R = torch.randn(r, r, generator=g) * 0.05
    direct = torch.linalg.vector_norm((w0 + s * B @ R @ A).double(), dim=1)
    got = factored_row_norm((w0 * w0).sum(1), w0 @ A.T, A @ A.T, B @ R, s)
    rel = ((got.double() - direct) / direct).abs().max().item()
    assert rel < 2e-5, rel


def test_training_changes_only_R_and_m_and_counts_parameters():
    base = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    r = 4
    model = get_peft_model(base, EdoraConfig(r=r, target_modules=ALL_LINEAR, seed=1))
    layers = edora_layers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".edora_R." in n or ".edora_magnitude." in n for n in trainable)
    expected_count = sum(r * r + layer.out_features for layer in layers.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_count
    frozen_AB = {n: (layer.edora_A["default"].clone(), layer.edora_B["default"].clone()) for n, layer in layers.items()}
    R0 = {n: layer.edora_R["default"].detach().clone() for n, layer in layers.items()}
    m0 = {n: layer.edora_magnitude["default"].detach().clone() for n, layer in layers.items()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 128, (4, 16))
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, layer in layers.items():
        assert not torch.equal(layer.edora_R["default"].detach(), R0[n]), n
        assert not torch.equal(layer.edora_magnitude["default"].detach(), m0[n]), n
        assert torch.equal(layer.edora_A["default"], frozen_AB[n][0])
        assert torch.equal(layer.edora_B["default"], frozen_AB[n][1])
    for k, v in model.get_base_model().state_dict().items():
        if ".base_layer." in k or "edora_" not in k:
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k


def test_loraxs_counts_and_formula():
    base = tiny_llama(seed=5)
    r = 4
    model = get_peft_model(base, EdoraConfig(r=r, target_modules=ALL_LINEAR, use_magnitude=False))
    randomize_adapter(model)
    layers = edora_layers(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(layers) * r * r
    for _name, layer in layers.items():
        assert "default" not in layer.edora_magnitude
        w0 = layer.get_base_layer().weight.detach()
        A, B, R = layer.edora_A["default"], layer.edora_B["default"], layer.edora_R["default"].detach()
        x = torch.randn(2, 3, layer.in_features)
        torch.testing.assert_close(layer(x).detach(), x @ w0.T + x @ A.T @ R.T @ B.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_base_matches_fp32_formula(dtype, tol):
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 48, bias=True)).to(dtype)
    model = get_peft_model(lin, EdoraConfig(r=8, target_modules=["0"]))
    randomize_adapter(model)
    layer = edora_layers(model)["base_model.model.0"]
    assert layer.edora_R["default"].dtype == torch.float32  # adapter stays fp32 on a low-precision base
    w0 = layer.get_base_layer().weight.detach().float()
    b = layer.get_base_layer().bias.detach().float()
    ref_w = reference_weight(w0, layer.edora_A["default"], layer.edora_B["default"],
                             layer.edora_R["default"].detach(), layer.edora_magnitude["default"].detach(), 1.0)
    x = torch.randn(4, 64).to(dtype)
    got = model(x).detach()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), x.float() @ ref_w.T + b, rtol=tol, atol=tol)


def test_dropout_path_follows_the_decomposed_formula():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(20, 16, bias=True))
    w0, b = lin[0].weight.detach().clone(), lin[0].bias.detach().clone()
    model = get_peft_model(lin, EdoraConfig(r=4, target_modules=["0"], dropout=0.5))
    randomize_adapter(model)
    layer = edora_layers(model)["base_model.model.0"]
    mask = (torch.rand(3, 20) > 0.5).float() * 2

    class FixedMask(nn.Module):
        def forward(self, x):
            return x * mask

    layer.edora_dropout["default"] = FixedMask()
    model.train()
    x = torch.randn(3, 20)
    A, B, R, m = (layer.edora_A["default"], layer.edora_B["default"], layer.edora_R["default"].detach(),
                  layer.edora_magnitude["default"].detach())
    scale = m / torch.linalg.vector_norm(w0 + B @ R @ A, dim=1)
    xd = x * mask
    expected = (x @ w0.T + b) + (scale - 1) * (xd @ w0.T) + scale * (xd @ A.T @ R.T @ B.T)
    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-5, atol=1e-6)
    layer.edora_dropout["default"] = nn.Dropout(0.5)
    model.eval()  # no dropout at inference: the plain formula
    torch.testing.assert_close(model(x).detach(), x @ reference_weight(w0, A, B, R, m, 1.0).T + b,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_unmerge_and_merge_and_unload(dtype, tol):
    base = tiny_llama(seed=6, dtype=dtype)
    w_orig = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, EdoraConfig(r=4, target_modules=ALL_LINEAR, seed=0))
    randomize_adapter(model)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        adapter_logits = model(x).logits.float()
        model.merge_adapter()
        merged_logits = model(x).logits.float()
        model.unmerge_adapter()
        unmerged_logits = model(x).logits.float()
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=tol, atol=tol)
    torch.testing.assert_close(unmerged_logits, adapter_logits, rtol=tol, atol=tol)
    for layer_name, layer in edora_layers(model).items():
        key = layer_name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(layer.get_base_layer().weight.float(), w_orig[key].float(),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6 if dtype == torch.float32
                                   else 1e-2)
    plain = model.merge_and_unload()
    assert not any("edora" in k for k in plain.state_dict())
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits.float(), adapter_logits, rtol=tol, atol=tol)


def test_terms_merge_and_its_inverse_against_the_dense_formula():
    """pipeline/edora/terms.py: W' = (m / ||W0 + sBRA||_row) ⊙ (W0 + sBRA) written out here in float64, its inverse
    gives W0 back, and the fingerprint is the median relative row-norm difference."""
    from pipeline.edora import terms

    g = torch.Generator().manual_seed(3)
    w0, a, b = (torch.randn(12, 20, generator=g), torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g))
    r, m, s = torch.randn(4, 4, generator=g) * 0.1, torch.rand(12, generator=g) + 0.5, 0.7
    dense = reference_weight(w0.double(), a.double(), b.double(), r.double(), None, s, use_magnitude=False)
    expect = reference_weight(w0.double(), a.double(), b.double(), r.double(), m.double(), s)
    w, n = terms.merged_weight(w0, a, b, r, m, s)
    assert torch.allclose(w.double(), expect, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms.base_from_merged(w, a, b, r, m, n, s), w0, rtol=1e-4, atol=1e-5)
    w_xs, ones = terms.merged_weight(w0, a, b, r, None, s)  # LoRA-XS: no magnitude, no normalisation
    assert torch.allclose(w_xs.double(), dense, rtol=1e-5, atol=1e-6) and torch.equal(ones, torch.ones(12))
    assert torch.allclose(terms.gram(a), a @ a.T) and torch.allclose(terms.projection(w0, a), w0 @ a.T)
    scaled = w0.clone()
    scaled[:7] *= 1.1  # 7 of 12 rows 10% larger: the median row moved by 10%
    dev = terms.fingerprint_deviation(terms.row_norm2(w0), terms.row_norm2(scaled))
    assert abs(dev - 0.1) < 1e-5 and terms.fingerprint_deviation(terms.row_norm2(w0), terms.row_norm2(w0)) == 0
