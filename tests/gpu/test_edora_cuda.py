"""EDoRA on CUDA: bf16 and NF4 bases, autocast, torch.compile. Run on the GPU host: python -m pytest -m gpu."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from pipeline.edora import EdoraConfig, Linear

pytestmark = pytest.mark.gpu


def formula(x, w0, A, B, R, m, s=1.0):
    w = w0 + s * B @ R @ A
    return x @ ((m / torch.linalg.vector_norm(w, dim=1))[:, None] * w).T


def test_bf16_cuda_forward_matches_fp32_formula():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(1024, 2048, bias=False)).cuda().to(torch.bfloat16),
                           EdoraConfig(r=64, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.02)
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16)
    expected = formula(x.float(), layer.get_base_layer().weight.float(), layer.edora_A["default"],
                       layer.edora_B["default"], layer.edora_R["default"].detach(),
                       layer.edora_magnitude["default"].detach())
    got = layer(x)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - expected).norm() / expected.norm()).item()
    assert rel < 1e-2, rel
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the Trainer's bf16 mode
        rel_ac = ((layer(x).float() - expected).norm() / expected.norm()).item()
    assert rel_ac < 1e-2, rel_ac


def test_nf4_cuda_init_forward_backward_merge():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(2048, 1024) * 0.02
    q = bnb.nn.Linear4bit(1024, 2048, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    q = q.cuda()
    model = get_peft_model(nn.Sequential(q), EdoraConfig(r=32, target_modules=["0"], svd_method="exact"))
    layer = model.base_model.model[0]
    assert isinstance(layer, Linear)
    w0 = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    torch.testing.assert_close(layer.edora_magnitude["default"].detach(), torch.linalg.vector_norm(w0, dim=1))
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.02)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    expected = formula(x.float(), w0, layer.edora_A["default"], layer.edora_B["default"],
                       layer.edora_R["default"].detach(), layer.edora_magnitude["default"].detach())
    out = layer(x)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    out.float().pow(2).mean().backward()
    assert layer.edora_R["default"].grad.abs().sum() > 0 and layer.edora_magnitude["default"].grad.abs().sum() > 0
    w_merged, _ = layer.merged_weight("default")
    torch.testing.assert_close(x.float() @ w_merged.T, expected, rtol=1e-3, atol=1e-3)


def test_torch_compile_gives_the_eager_result():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 256)).cuda(),
                           EdoraConfig(r=16, target_modules=["0", "2"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear):
                m.edora_R["default"].normal_(0, 0.05)
    x = torch.randn(16, 512, device="cuda")
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compiled.sum().backward()
