"""EDoRA on bitsandbytes 4-bit (NF4 / FP4) base layers, on the CPU: init, forward, backward, merge."""

import pytest
import torch
from helpers import ALL_LINEAR, tiny_llama
from peft import get_peft_model

from pipeline.edora import EdoraConfig, Linear

bnb = pytest.importorskip("bitsandbytes")


def load_4bit(tmp_path, quant_type):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=0, hidden=64, intermediate=128).save_pretrained(tmp_path / "base")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg, device_map="cpu")


def dequantized(base_layer):
    return bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state).float()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_init_forward_backward_merge(tmp_path, quant_type):
    model = get_peft_model(load_4bit(tmp_path, quant_type),
                           EdoraConfig(r=4, target_modules=ALL_LINEAR, svd_method="exact", seed=0))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    assert len(layers) == 14
    layer = layers["base_model.model.model.layers.0.mlp.down_proj"]
    base = layer.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit)
    w0 = dequantized(base)

    # init comes from the dequantized weight: m = its row norms, B A its best rank-r approximation
    torch.testing.assert_close(layer.edora_magnitude["default"].detach(), torch.linalg.vector_norm(w0, dim=1))
    sv = torch.linalg.svdvals(w0.double())
    A, B = layer.edora_A["default"], layer.edora_B["default"]
    resid = torch.linalg.matrix_norm(w0.double() - (B @ A).double()) ** 2
    torch.testing.assert_close(resid, (sv[4:] ** 2).sum(), rtol=1e-4, atol=1e-8)

    # forward: the EDoRA formula with W0 = the dequantized weight. bnb's CPU 4-bit matmul need not be bit-equal to
    # x @ dequant(W)ᵀ, so x W0ᵀ is taken from the base layer itself (what EDoRA reuses) and checked separately.
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.05)
    R, m = layer.edora_R["default"].detach(), layer.edora_magnitude["default"].detach()
    x = torch.randn(2, 5, layer.in_features)
    n = torch.linalg.vector_norm(w0 + B @ R @ A, dim=1)
    with torch.no_grad():
        base_out = base(x)
    torch.testing.assert_close(base_out, x @ w0.T, rtol=0, atol=5e-3)
    expected = (m / n) * (x @ w0.T + x @ A.T @ R.T @ B.T)
    torch.testing.assert_close(layer(x).detach(), (m / n) * (base_out + x @ A.T @ R.T @ B.T), rtol=1e-5, atol=1e-6)

    # backward reaches R and m and leaves the packed 4-bit weight untouched
    ids = torch.randint(0, 128, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for lyr in layers.values():
        assert lyr.edora_R["default"].grad is not None and lyr.edora_R["default"].grad.abs().sum() > 0
        assert lyr.edora_magnitude["default"].grad.abs().sum() > 0
    # (bnb's CPU kernel repacks the 4-bit storage on first use, so compare what the base layer computes)
    assert not base.weight.requires_grad and base.weight.grad is None
    with torch.no_grad():
        assert torch.equal(base(x), base_out)

    # merge into the dequantized weight: a plain fp32 weight that reproduces the adapter's outputs exactly
    w_merged, _ = layer.merged_weight("default")
    torch.testing.assert_close(x @ w_merged.T, expected, rtol=1e-4, atol=1e-5)
