"""EDoRA on CUDA: bf16 and NF4 bases, autocast, torch.compile. Run on the GPU host: python -m pytest -m gpu."""

import pytest
import torch
from helpers import ALL_LINEAR, quantize_linears_nf4
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


@pytest.mark.parametrize("quant", [False, True])
def test_fast_path_gives_the_per_layer_gradients_on_cuda(quant):
    """Batched step terms (+ fused base matmul on bf16) vs the per-layer op: same loss and gradients on the second
    step, after an SGD update from each path's own first step (on NF4 the first step learns the compute dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.edora import ops

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    targets = ALL_LINEAR
    calls = {"terms": 0}
    orig = ops.EdoraStepTerms.forward

    def counted(*a):
        calls["terms"] += 1
        return orig(*a)

    ops.EdoraStepTerms.forward = staticmethod(counted)
    ids = torch.randint(0, 512, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = {}
    try:
        for fast in (False, True):
            torch.manual_seed(0)
            base = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
            if quant:
                pytest.importorskip("bitsandbytes")
                quantize_linears_nf4(base, targets)
            model = get_peft_model(base, EdoraConfig(r=16, target_modules=targets, seed=0))
            model.base_model.batch_step_terms = fast
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out[fast] = (loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    finally:
        ops.EdoraStepTerms.forward = staticmethod(orig)
    assert calls["terms"] == (3 if quant else 6)  # one batched call per shape group and step
    assert abs(out[True][0] - out[False][0]) < 1e-2 * abs(out[False][0])
    for n, g in out[False][1].items():
        rel = ((out[True][1][n] - g).norm() / g.norm()).item()
        assert rel < 2e-2, (n, rel)
