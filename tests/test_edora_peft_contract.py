"""PEFT's adapter life cycle on EDoRA, whose model overrides delete_adapter, inject_adapter and the unload path:
a second adapter (add_adapter / set_adapter), deleting one, and merging with safe_merge=True; each layer's output
pinned against the reference formula of tests/helpers.py."""

import pytest
import torch
from helpers import reference_weight
from peft import get_peft_model
from torch import nn

from pipeline.edora import EdoraConfig, Linear

TARGETS = ["0", "2"]


def make(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    w0 = {t: net[int(t)].weight.detach().clone() for t in TARGETS}
    return net, w0


def perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, Linear)):
            r = layer.edora_R[name]
            r.copy_(torch.randn(r.shape, generator=g) * 0.1)
            layer.edora_magnitude[name].mul_(1 + 0.1 * torch.rand(layer.edora_magnitude[name].shape, generator=g))


def expected(net, w0, layers, name, x):
    """The network with each adapted weight replaced by the reference formula of adapter `name`."""
    h = x
    for i, module in enumerate(net):
        key = str(i)
        if key in layers:
            lay = layers[key]
            w = reference_weight(w0[key], lay.edora_A[name], lay.edora_B[name], lay.edora_R[name].detach(),
                                 lay.edora_magnitude[name].detach(), lay.scaling[name])
            h = h @ w.T + lay.get_base_layer().bias
        else:
            h = module(h)
    return h


def test_a_second_adapter_is_added_switched_to_and_deleted():
    net, w0 = make()
    model = get_peft_model(net, EdoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, seed=0))
    model.add_adapter("other", EdoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, seed=1))
    perturb(model, "default", 1)
    perturb(model, "other", 2)
    layers = {t: model.base_model.model[int(t)] for t in TARGETS}
    x = torch.randn(5, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(net, w0, layers, "default", x), rtol=1e-5, atol=1e-6)
        model.set_adapter("other")
        assert all(layer.edora_R["other"].shape == (2, 2) for layer in layers.values())
        torch.testing.assert_close(model(x), expected(net, w0, layers, "other", x), rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)  # set_adapter trains the active adapter only

    model.train()  # the batched training path, built for the active adapter
    (model(x) ** 2).mean().backward()
    assert all(layer.edora_R["other"].grad is not None for layer in layers.values())
    model.zero_grad()

    model.set_adapter("default")
    model.delete_adapter("other")
    assert model.peft_config.keys() == {"default"}
    for layer in layers.values():
        for attr in ("edora_R", "edora_magnitude", "edora_A", "edora_B", "edora_P", "edora_G", "edora_row_norm2"):
            assert "other" not in getattr(layer, attr), attr
    (model(x) ** 2).mean().backward()  # the step terms of the deleted adapter are not reused
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(net, w0, layers, "default", x), rtol=1e-5, atol=1e-6)


def test_safe_merge_matches_the_formula_and_refuses_a_broken_adapter():
    net, w0 = make(1)
    model = get_peft_model(net, EdoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, seed=0))
    perturb(model, "default", 3)
    layers = {t: model.base_model.model[int(t)] for t in TARGETS}
    x = torch.randn(5, 32)
    model.eval()
    with torch.no_grad():
        want = expected(net, w0, layers, "default", x)
        refs = {t: reference_weight(w0[t], lay.edora_A["default"], lay.edora_B["default"],
                                    lay.edora_R["default"], lay.edora_magnitude["default"], lay.scaling["default"])
                for t, lay in layers.items()}
        model.merge_adapter(safe_merge=True)
        for t, lay in layers.items():
            torch.testing.assert_close(lay.get_base_layer().weight, refs[t], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        for t, lay in layers.items():
            torch.testing.assert_close(lay.get_base_layer().weight, w0[t], rtol=1e-5, atol=1e-6)

        layers["2"].edora_R["default"][0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN/Inf"):
            model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(layers["2"].get_base_layer().weight, w0["2"], rtol=1e-5, atol=1e-6)

    layers["2"].edora_R["default"].data.zero_()  # R = 0: W' = (m / ||W0||) ⊙ W0, and m was scaled by perturb
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, Linear) for m in merged.modules())
    with torch.no_grad():
        assert torch.isfinite(merged(x)).all()
        torch.testing.assert_close(merged[0].weight, refs["0"], rtol=1e-5, atol=1e-6)
