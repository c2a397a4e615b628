"""Saving and reloading EDoRA adapters, refusing wrong bases, and clear errors on bad configs."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import ALL_LINEAR, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tests_paths import ROOT
from torch import nn

from pipeline.edora import EdoraConfig, Linear, load_edora_adapter
from pipeline.edora.loader import AdapterError


@pytest.fixture()
def saved_adapter(tmp_path):
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, EdoraConfig(r=4, target_modules=ALL_LINEAR, seed=3))
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, Linear)):
            layer.edora_R["default"].normal_(0, 0.05)
            layer.edora_magnitude["default"].mul_(1.05)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    return tmp_path


def test_adapter_files_hold_the_named_tensors(saved_adapter):
    cfg = json.loads((saved_adapter / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "EDORA" and cfg["r"] == 4 and cfg["use_magnitude"] is True
    sd = load_file(saved_adapter / "adapter" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    assert sd[q + "edora_R"].shape == (4, 4)
    assert sd[q + "edora_magnitude"].shape == (64,)
    assert sd[q + "edora_A"].shape == (4, 64) and sd[q + "edora_B"].shape == (64, 4)
    assert sd[q + "edora_row_norm2"].shape == (64,)
    assert not any("edora_P" in k or "edora_G" in k for k in sd)  # derived terms are recomputed, not stored
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_reload_in_a_fresh_process_gives_identical_logits_without_svd(saved_adapter):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import pipeline.edora.svd as svd
        def no_svd(*a, **k):
            raise AssertionError("loading must not run the SVD")
        svd.truncated_svd = no_svd
        import pipeline.edora.layer as layer
        layer.truncated_svd = no_svd
        import pipeline.edora
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(saved_adapter / "base")!r})
        model = PeftModel.from_pretrained(base, {str(saved_adapter / "adapter")!r})
        exp = torch.load({str(saved_adapter / "expected.pt")!r})
        with torch.no_grad():
            got = model(exp["x"]).logits
        assert torch.equal(got, exp["logits"]), (got - exp["logits"]).abs().max()
        print("IDENTICAL")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "IDENTICAL" in out.stdout, out.stderr[-3000:]


def test_loader_and_trainable_reload(saved_adapter):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_adapter / "base")
    model = load_edora_adapter(base, saved_adapter / "adapter", is_trainable=True)
    exp = torch.load(saved_adapter / "expected.pt")
    with torch.no_grad():
        assert torch.equal(model(exp["x"]).logits, exp["logits"])
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"edora_R",
                                                                                          "edora_magnitude"}


def test_without_the_plugin_peft_refuses_instead_of_loading_lora(saved_adapter):
    script = textwrap.dedent(f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(saved_adapter / "base")!r})
        PeftModel.from_pretrained(base, {str(saved_adapter / "adapter")!r})
        print("LOADED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "LOADED" not in out.stdout
    assert "EDORA" in out.stderr  # the error names the method that is missing


def test_save_adapter_writes_a_card_that_says_what_to_import(tmp_path):
    from pipeline.edora import save_adapter

    model = get_peft_model(tiny_llama(), EdoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "import pipeline.edora" in card and "EDoRA" in card
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_wrong_base_weights_refused(saved_adapter):
    other = tiny_llama(seed=99)  # same shapes, different weights
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(other, saved_adapter / "adapter")


def test_wrong_base_shape_refused(saved_adapter):
    other = tiny_llama(seed=0, hidden=32, intermediate=48)
    with pytest.raises(AdapterError, match="does not fit this base model"):
        load_edora_adapter(other, saved_adapter / "adapter")


def test_missing_adapter_dir_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_edora_adapter(tiny_llama(), tmp_path / "nope")


@pytest.mark.parametrize("r", [0, -1, 65])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r"):
        get_peft_model(tiny_llama(), EdoraConfig(r=r, target_modules=["q_proj"]))


def test_target_that_matches_nothing_lists_the_linear_modules():
    with pytest.raises(ValueError, match=r"Linear modules this model has: \['down_proj', 'gate_proj'"):
        get_peft_model(tiny_llama(), EdoraConfig(r=2, target_modules=["qkv"]))


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_peft_model(tiny_llama(), EdoraConfig(r=2, target_modules=["embed_tokens"]))


def test_non_finite_weight():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        get_peft_model(model, EdoraConfig(r=2, target_modules=["q_proj"]))


def test_bad_config_values_are_reported_together():
    with pytest.raises(ValueError) as e:
        EdoraConfig(r=4, dropout=1.5, svd_method="fast", svd_target="rows")
    msg = str(e.value)
    assert "dropout" in msg and "svd_method" in msg and "svd_target" in msg


def test_layers_to_transform_and_modules_to_save(tmp_path):
    model = get_peft_model(tiny_llama(), EdoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1],
                                                     layers_pattern="layers", modules_to_save=["lm_head"]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj"]
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert isinstance(model.base_model.model.lm_head.modules_to_save["default"], nn.Linear)
