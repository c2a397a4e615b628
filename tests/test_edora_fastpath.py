"""The training fast path (pipeline/edora/step_terms.py): per-step terms of all layers batched, base matmul fused.

It must compute what the per-layer path computes (which test_edora_math pins to the paper's formula), and step
aside wherever it cannot: eval, no_grad, reentrant checkpointing, merged or disabled adapters, stale terms.
"""

import pytest
import torch
from helpers import ALL_LINEAR, reference_weight, tiny_llama
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from pipeline.edora import EdoraConfig, Linear, ops


def edora_layers(model):
    return [m for m in model.modules() if isinstance(m, Linear)]


def build(fast=True, dtype=torch.float32, seed=0, **cfg):
    model = get_peft_model(tiny_llama(seed=0, dtype=dtype),
                           EdoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=0, **cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in edora_layers(model):
            R, m = layer.edora_R["default"], layer.edora_magnitude["default"]
            R.copy_(torch.randn(R.shape, generator=g) * 0.1)
            m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))
    model.base_model.batch_step_terms = fast
    model.train()
    return model


@pytest.fixture
def count_ops(monkeypatch):
    """How often each autograd op ran (forward), to tell which path a step took. `apply_linear`: EdoraApply with
    the base matmul inside (W0 given); `apply`: EdoraApply on the base layer's output."""
    calls = {"per_layer": 0, "apply": 0, "apply_linear": 0, "terms": 0}

    def counter(cls, key_of):
        orig = cls.forward

        def counted(*a):
            calls[key_of(a)] += 1
            return orig(*a)
        monkeypatch.setattr(cls, "forward", staticmethod(counted))

    counter(ops.EdoraLinearAdapter, lambda a: "per_layer")
    counter(ops.EdoraStepTerms, lambda a: "terms")
    counter(ops.EdoraApply, lambda a: "apply" if a[3] is None else "apply_linear")  # a = (ctx, x, base, w0, ..)
    return calls


def train(model, steps=3, ids=None, accumulate=1):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        for k in range(accumulate):
            loss = model(input_ids=ids[k::accumulate], labels=ids[k::accumulate]).loss
            (loss / accumulate).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_single_layer_gradients_equal_the_dense_formula(count_ops):
    # reference: W' = (m / n) ⊙ (W0 + s B R A) built densely, n the direct row norm, detached (DoRA §4.3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 24, bias=False))
    w0 = net[0].weight.detach().clone()
    model = get_peft_model(net, EdoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.edora_R["default"].normal_(0, 0.1)
        layer.edora_magnitude["default"].mul_(1.1)
    model.train()
    x = torch.randn(3, 6, 32)
    target = torch.randn(3, 6, 24)
    xg = x.clone().requires_grad_()
    ((model(xg) - target) ** 2).mean().backward()  # the first step already: a plain Linear's dtype is known
    assert count_ops["terms"] == 1 and count_ops["apply_linear"] == 1 and count_ops["per_layer"] == 0

    A, B = layer.edora_A["default"], layer.edora_B["default"]
    R = layer.edora_R["default"].detach().clone().requires_grad_()
    m = layer.edora_magnitude["default"].detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ((x2 @ reference_weight(w0, A, B, R, m, 2.0, detach_norm=True).T - target) ** 2).mean().backward()
    torch.testing.assert_close(layer.edora_R["default"].grad, R.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.edora_magnitude["default"].grad, m.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(xg.grad, x2.grad, rtol=1e-4, atol=1e-7)


def test_training_equals_the_per_layer_path_fp32(count_ops):
    slow, fast = build(fast=False), build(fast=True)
    loss_slow = train(slow, steps=4, accumulate=2)
    per_layer_calls = count_ops["per_layer"]
    assert per_layer_calls == 4 * 2 * 14 and count_ops["terms"] == 0
    loss_fast = train(fast, steps=4, accumulate=2)
    # every micro-step batched (3 shape groups), the first one too
    assert count_ops["per_layer"] == per_layer_calls
    assert count_ops["terms"] == 8 * 3 and count_ops["apply_linear"] == 8 * 14
    torch.testing.assert_close(torch.tensor(loss_fast), torch.tensor(loss_slow), rtol=1e-6, atol=0)
    ps, pf = trainable(slow), trainable(fast)
    assert ps.keys() == pf.keys() and all(k.rsplit(".", 2)[-2] in ("edora_R", "edora_magnitude") for k in ps)
    for k in ps:
        torch.testing.assert_close(pf[k], ps[k], rtol=1e-5, atol=1e-7)


def test_training_equals_the_per_layer_path_bf16():
    slow, fast = build(fast=False, dtype=torch.bfloat16), build(fast=True, dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (slow, fast):
        model(input_ids=ids, labels=ids).loss.backward()
    assert any(layer._edora_step is not None for layer in edora_layers(fast))
    # gradients per tensor: bf16 rounds the two paths differently (Adam's per-element normalisation would turn that
    # rounding of a near-zero gradient into a full-size step, so parameters after Adam are compared by the losses)
    for (k, ps), pf in zip(slow.named_parameters(), fast.parameters()):
        if ps.requires_grad:
            assert pf.grad.dtype == torch.float32  # R and m stay fp32 on a bf16 base
            assert (pf.grad - ps.grad).norm() < 0.03 * ps.grad.norm(), k
    slow.zero_grad()
    fast.zero_grad()
    loss_slow, loss_fast = train(slow, steps=3), train(fast, steps=3)
    torch.testing.assert_close(torch.tensor(loss_fast), torch.tensor(loss_slow), rtol=2e-2, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(count_ops, reentrant):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = build(fast=False)
    ref(input_ids=ids, labels=ids).loss.backward()
    model = build(fast=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for _ in range(2):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    # reentrant checkpointing would run the shared terms' backward once per layer: the fast path steps aside
    assert (count_ops["terms"] > 0) is (not reentrant)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8)


def test_steps_aside_for_eval_no_grad_stale_terms_merged_and_disabled(count_ops):
    model = build(fast=True)
    train(model, steps=2)
    layer = edora_layers(model)[0]
    x = torch.randn(3, layer.in_features)
    terms_before = count_ops["terms"]
    # after backward the terms are spent: a direct call to a layer runs the per-layer path
    before = count_ops["per_layer"]
    layer(x).sum().backward()
    assert count_ops["per_layer"] == before + 1
    ids = torch.randint(0, 128, (1, 8))
    for ctx in ("eval", "no_grad", "merged", "disabled"):
        model.train()
        if ctx == "eval":
            model.eval()
        before = count_ops["per_layer"]
        if ctx == "merged":
            model.merge_adapter()
        if ctx == "disabled":
            with model.disable_adapter():
                model(input_ids=ids)
        elif ctx == "no_grad":
            with torch.no_grad():
                model(input_ids=ids)
        else:
            model(input_ids=ids)
        if ctx == "merged":
            model.unmerge_adapter()
        assert count_ops["terms"] == terms_before, ctx
        assert count_ops["per_layer"] == before + (0 if ctx in ("merged", "disabled") else 14), ctx
    # terms computed before an in-place change of R are not reused
    model.train()
    model(input_ids=ids)
    with torch.no_grad():
        layer.edora_R["default"].add_(0.01)
    before = count_ops["per_layer"]
    layer(x)
    assert count_ops["per_layer"] == before + 1


def test_save_and_reload_after_fast_training(tmp_path):
    model = build(fast=True)
    model.save_pretrained(tmp_path / "before")
    train(model, steps=3)
    layers = edora_layers(model)
    # the frozen buffers are views of the group stacks now; the saved adapter holds each layer's own slice
    assert layers[0].edora_B["default"]._base is not None
    model.save_pretrained(tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size == (tmp_path / "before" / "adapter_model.safetensors").stat().st_size
    model.eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    from pipeline.edora import load_edora_adapter

    reloaded = load_edora_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)


def test_loading_weights_into_a_model_that_trained_fast_is_seen_by_the_next_step(count_ops):
    donor = build(fast=False, seed=5)
    state = get_peft_model_state_dict(donor)
    model = build(fast=True)
    train(model, steps=2)
    set_peft_model_state_dict(model, state)  # copies into the views: the stacks see the new values
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    terms = count_ops["terms"]
    got = model(input_ids=ids, labels=ids).loss
    assert count_ops["terms"] == terms + 3
    want = donor(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # replacing buffers (here by moving to another dtype and back) breaks the views: the groups are rebuilt
    model.to(torch.float64).to(torch.float32)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, want, rtol=1e-6, atol=0)


def test_loading_with_assign_replaces_parameters_and_the_next_step_trains_the_new_ones(count_ops):
    donor = build(fast=False, seed=7)
    state = {k: v.clone() for k, v in donor.state_dict().items() if ".edora_" in k}
    model = build(fast=True)
    train(model, steps=1)
    model.load_state_dict(state, strict=False, assign=True)  # new Parameter objects, new buffers
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    terms = count_ops["terms"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert count_ops["terms"] == terms + 3
    torch.testing.assert_close(loss, donor(input_ids=ids, labels=ids).loss, rtol=1e-6, atol=0)
    for layer in edora_layers(model):
        assert layer.edora_R["default"].grad is not None and layer.edora_magnitude["default"].grad is not None


def test_4bit_base_uses_the_batched_terms_with_its_own_matmul(tmp_path, count_ops):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    params = {}
    for fast in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg, device_map="cpu")
        model = get_peft_model(base, EdoraConfig(r=4, target_modules=ALL_LINEAR, seed=0))
        model.base_model.batch_step_terms = fast
        model.train()
        train(model, steps=3)
        params[fast] = trainable(model)
    assert count_ops["apply"] == 2 * 14 and count_ops["apply_linear"] == 0  # bnb's matmul stays bnb's
    for k in params[False]:
        torch.testing.assert_close(params[True][k], params[False][k], rtol=1e-5, atol=1e-7)


def test_a_deleted_model_is_freed_at_once():
    """No reference cycles through EDoRA's hooks: deleting a trained model frees it (its GPU memory) immediately,
    not at some later garbage collection."""
    import gc
    import weakref

    model = build(fast=True)
    train(model, steps=2)
    layer = weakref.ref(edora_layers(model)[0])
    gc.disable()
    try:
        del model
        assert layer() is None
    finally:
        gc.enable()


def test_bf16_autocast_keeps_the_fused_base_matmul(count_ops):
    """The Trainer's bf16 mode runs the model under autocast; with a bf16 base that changes no dtype, so the base
    matmul stays in the adapter's node, and the result equals the run without autocast."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for ac in (False, True):
        model = build(fast=True, dtype=torch.bfloat16)
        for _ in range(2):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads[ac] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert count_ops["apply_linear"] == 2 * 2 * 14 and count_ops["apply"] == 0
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-2, atol=1e-4)


def test_fast_path_resumes_after_a_cast_away_and_back(count_ops):
    model = build(fast=True)
    train(model, steps=2)
    ids = torch.randint(0, 128, (2, 12))
    model.to(torch.float64)  # fp64 adapter tensors: not eligible, the per-layer path runs
    before = count_ops["terms"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert count_ops["terms"] == before
    model.to(torch.float32)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert count_ops["terms"] == before + 3


def test_a_wrong_compute_dtype_guess_costs_one_per_layer_step(count_ops, monkeypatch):
    from pipeline.edora import step_terms

    monkeypatch.setattr(step_terms._Group, "_guess_cdt", lambda self: torch.float64)  # as if autocast lied
    slow, fast = build(fast=False), build(fast=True)
    loss_slow = train(slow, steps=3)
    per_layer = count_ops["per_layer"]
    loss_fast = train(fast, steps=3)
    # step 1: terms computed for float64, no layer computes in it, so all 14 take the per-layer path and record
    # float32; steps 2 and 3 run batched
    assert count_ops["per_layer"] - per_layer == 14 and count_ops["apply_linear"] == 2 * 14
    torch.testing.assert_close(torch.tensor(loss_fast), torch.tensor(loss_slow), rtol=1e-6, atol=0)
    ps, pf = trainable(slow), trainable(fast)
    for k in ps:
        torch.testing.assert_close(pf[k], ps[k], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # ~2 min of compilation on 2 cores
def test_torch_compile_runs_the_batched_terms_and_trains_like_eager(monkeypatch):
    """Under torch.compile the hook runs eagerly (outside the graph): the batched terms are computed every step and
    enter the one compiled graph as inputs (no recompile per step), and training equals the eager per-layer path."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = build(fast=False)
    loss_ref = train(ref, steps=3)
    model = build(fast=True)
    compiled = torch.compile(model)
    terms, orig = [], ops.EdoraStepTerms.forward  # counted outside the graph only (it runs eagerly)
    monkeypatch.setattr(ops.EdoraStepTerms, "forward", staticmethod(lambda *a: terms.append(1) or orig(*a)))
    loss = train(compiled, steps=3)
    assert len(terms) == 3 * 3  # 3 shape groups, every step (the first one too)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(loss_ref), rtol=1e-5, atol=0)
    pr, pm = trainable(ref), trainable(model)
    for k in pr:
        torch.testing.assert_close(pm[k], pr[k], rtol=1e-4, atol=1e-6)
    model.eval()  # eval under the compiled model: the per-layer path, same logits as eager
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, ref.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
