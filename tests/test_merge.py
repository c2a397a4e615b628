"""`python -m pipeline merge`: merged logits equal the adapter's, the output is a plain HF checkpoint, 4-bit-trained
adapters merge both ways, and every refusal is clear and leaves nothing that looks complete."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ALL_LINEAR, VOCAB, make_run, perturb, tiny_llama, tiny_tokenizer
from peft import get_peft_model
from safetensors import safe_open
from tests_paths import ROOT
from transformers import AutoModelForCausalLM

from pipeline.adapter_meta import AdapterMeta
from pipeline.cli import main as cli
from pipeline.edora import EdoraConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("merge"))


def merge(*args):
    return cli(["merge", *map(str, args)])


def tensor_keys(d):
    keys = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys += list(h.keys())
    return keys


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_fp32_merge_equals_adapter_and_is_a_plain_checkpoint(run_dir):
    base, adapter, x, expected = run_dir
    assert merge("--adapter", adapter, "--dtype", "float32") == 0
    out = adapter.parent / "merged"  # default: beside the adapter
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "merge_report.json",
            "tokenizer.json", "tokenizer_config.json", "model-00001-of-00001.safetensors"} <= names
    keys = tensor_keys(out)
    assert keys and not any("edora" in k or "lora" in k or k.startswith("base_model") for k in keys)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(keys)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    report = json.loads((out / "merge_report.json").read_text())
    v = report["verification"]
    assert v["passed"] and v["gate"] == "adapter" and v["comparisons"]["adapter"]["max_abs_logit_diff"] < 1e-5
    assert v["comparisons"]["adapter"]["argmax_agreement"] == 1.0 and v["prompt_kind"] == "text"
    assert report["stats"]["modules_merged"] == 14 and report["method"] == "streamed"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_merge_within_tolerance(run_dir, tmp_path, dtype):
    base, adapter, x, expected = run_dir
    assert merge("--adapter", adapter, "--out", tmp_path / "m", "--dtype", dtype) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.dtype == getattr(torch, dtype)
    with torch.no_grad():
        got = model(x).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05)
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["verification"]["passed"]


def test_default_dtype_is_the_base_checkpoints(run_dir, tmp_path):
    base, adapter, *_ = run_dir
    assert merge("--adapter", adapter, "--out", tmp_path / "m", "--no-verify") == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["dtype"] == "float32" and report["verification"] == {"skipped": True}


def test_loraxs_and_many_shards(tmp_path):
    base, adapter, x, expected = make_run(tmp_path, use_magnitude=False)
    assert merge("--adapter", adapter, "--out", tmp_path / "m", "--dtype", "float32", "--max-shard-size",
                 "100KB") == 0
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bf16_adapter_tensors_merge_like_zero3_saves(run_dir, tmp_path):
    """ZeRO-3 saves 16-bit adapter tensors: they are cast to fp32 for the math, and the result matches PEFT's."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter, x, _ = run_dir
    bf = tmp_path / "adapter"
    shutil.copytree(adapter, bf)
    sd = load_file(bf / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, bf / "adapter_model.safetensors")
    assert merge("--adapter", bf, "--out", tmp_path / "m", "--dtype", "float32") == 0
    v = json.loads((tmp_path / "m" / "merge_report.json").read_text())["verification"]
    assert v["passed"] and v["comparisons"]["adapter"]["max_abs_logit_diff"] < 1e-5


def test_base_without_safetensors_merges_in_memory(run_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    base, adapter, x, expected = run_dir
    binbase = tmp_path / "base"
    shutil.copytree(base, binbase)
    torch.save(load_file(binbase / "model.safetensors"), binbase / "pytorch_model.bin")
    (binbase / "model.safetensors").unlink()
    assert merge("--adapter", adapter, "--base", binbase, "--out", tmp_path / "m", "--dtype", "float32") == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["method"] == "in_memory" and report["verification"]["passed"]
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_peft_dora_adapter_falls_back_to_merge_and_unload(tmp_path):
    from peft import LoraConfig

    base = tiny_llama(seed=0, vocab=VOCAB)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=ALL_LINEAR, use_dora=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    assert merge("--adapter", tmp_path / "adapter", "--base", tmp_path / "base", "--out", tmp_path / "m",
                 "--dtype", "float32") == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["method"] == "peft_merge_and_unload"
    assert report["verification"]["comparisons"]["adapter"]["max_abs_logit_diff"] < 1e-4
    assert not any("lora" in k for k in tensor_keys(tmp_path / "m"))


# ---- adapters trained on a 4-bit base -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["nf4", "nf4-double-quant"])
def run_4bit(request, tmp_path_factory):
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("q")
    tiny_llama(seed=0, vocab=VOCAB, intermediate=128).save_pretrained(root / "base")
    tiny_tokenizer(root / "base", vocab_size=VOCAB)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=request.param)
    qbase = AutoModelForCausalLM.from_pretrained(root / "base", quantization_config=qcfg, device_map="cpu",
                                                 dtype=torch.float32)
    model = get_peft_model(qbase, EdoraConfig(r=4, target_modules=ALL_LINEAR, seed=3))
    perturb(model)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x).logits
    adapter = root / "run" / "adapter"
    model.save_pretrained(adapter)
    # what the trainer writes beside a 4-bit-trained adapter
    AdapterMeta(base_load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=request.param,
                bnb_4bit_compute_dtype="float32", bnb_4bit_quant_storage="uint8", bnb_4bit_blocksize=64,
                base_dtype="float32").write(adapter)
    return root / "base", adapter, x, logits


def test_4bit_into_dequantized_reproduces_the_trained_model(run_4bit, tmp_path):
    base, adapter, x, expected = run_4bit
    assert merge("--adapter", adapter, "--base", base, "--out", tmp_path / "m", "--dtype", "float32", "--into",
                 "dequantized") == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    v = report["verification"]
    assert report["into"] == "dequantized" and v["gate"] == "adapter_4bit_base" and v["passed"]
    assert v["comparisons"]["adapter_4bit_base"]["max_abs_logit_diff"] < 1e-5
    assert report["stats"]["dequantized_vs_full_weight_rel_diff_mean"] > 0.01  # NF4 moved the weights


def test_4bit_into_full_is_within_quantization_error(run_4bit, tmp_path):
    base, adapter, x, expected = run_4bit
    assert merge("--adapter", adapter, "--base", base, "--out", tmp_path / "m", "--dtype", "float32") == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    v = report["verification"]
    assert report["into"] == "full" and v["gate"] == "adapter_full_base" and v["passed"]
    full, quant = v["comparisons"]["adapter_full_base"], v["comparisons"]["adapter_4bit_base"]
    assert full["max_abs_logit_diff"] < 1e-5
    assert 1e-4 < quant["max_abs_logit_diff"] < 0.2  # the quantization error, reported, not a failure
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0.2)


def test_4bit_settings_read_from_a_resolved_recipe(tmp_path):
    from pipeline.merging.adapter import read_quant_info

    (tmp_path / "adapter").mkdir()
    (tmp_path / "recipe.yaml").write_text("model:\n  name_or_path: x\n  load_in_4bit: true\n  dtype: bfloat16\n")
    q = read_quant_info(tmp_path / "adapter")
    assert q.quant_type == "nf4" and q.double_quant is True and q.base_dtype == "bfloat16"
    (tmp_path / "recipe.yaml").write_text("model:\n  name_or_path: x\n")
    assert read_quant_info(tmp_path / "adapter") is None


def test_4bit_settings_left_out_mean_the_recipe_defaults(tmp_path):
    """A setting edora_meta.json or a resolved recipe leaves out means what the recipe would have used: both read
    double quantization as on (the meta reader used to read it as off), and build the same BitsAndBytesConfig."""
    from pipeline.merging.adapter import read_quant_info
    from pipeline.recipe import ModelConfig

    default = ModelConfig(name_or_path="x", load_in_4bit=True)
    assert default.bnb_4bit_use_double_quant is True
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "edora_meta.json").write_text('{"base_load_in_4bit": true}')
    (tmp_path / "b" / "adapter").mkdir(parents=True)
    (tmp_path / "b" / "recipe.yaml").write_text("model:\n  name_or_path: x\n  load_in_4bit: true\n")
    from_meta, from_recipe = read_quant_info(tmp_path / "a"), read_quant_info(tmp_path / "b" / "adapter")
    for q in (from_meta, from_recipe):
        assert (q.quant_type, q.double_quant, q.compute_dtype, q.quant_storage, q.base_dtype) == \
            ("nf4", True, "bfloat16", "uint8", "bfloat16")
        cfg = q.bnb_config()
        assert cfg.bnb_4bit_use_double_quant is True and cfg.bnb_4bit_quant_type == "nf4"
        assert cfg.to_dict() == default.bnb_config().to_dict()


# ---- refusals -------------------------------------------------------------------------------------------------


def refused(capsys, *args):
    rc = merge(*args)
    return rc, capsys.readouterr().err


def test_wrong_base_is_refused_by_fingerprint(run_dir, tmp_path, capsys):
    base, adapter, *_ = run_dir
    tiny_llama(seed=99, vocab=VOCAB).save_pretrained(tmp_path / "other")
    rc, err = refused(capsys, "--adapter", adapter, "--base", tmp_path / "other", "--out", tmp_path / "m")
    assert rc == 2 and "different base model" in err and "row norms" in err
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


def test_wrong_shapes_are_refused(run_dir, tmp_path, capsys):
    base, adapter, *_ = run_dir
    tiny_llama(seed=0, vocab=VOCAB, hidden=32, intermediate=48).save_pretrained(tmp_path / "other")
    rc, err = refused(capsys, "--adapter", adapter, "--base", tmp_path / "other", "--out", tmp_path / "m")
    assert rc == 2 and "does not fit this base model" in err and "shape" in err
    assert not (tmp_path / "m").exists()


def test_non_empty_out_is_refused_unless_overwrite(run_dir, tmp_path, capsys):
    base, adapter, *_ = run_dir
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("keep me")
    rc, err = refused(capsys, "--adapter", adapter, "--out", tmp_path / "m", "--no-verify")
    assert rc == 2 and "not empty" in err and "--overwrite" in err
    assert (tmp_path / "m" / "old.txt").exists()
    # --overwrite replaces only a previous merge output (a dir with merge_report.json)
    rc, err = refused(capsys, "--adapter", adapter, "--out", tmp_path / "m", "--no-verify", "--overwrite")
    assert rc == 2 and "not a previous merge output" in err and (tmp_path / "m" / "old.txt").exists()
    assert merge("--adapter", adapter, "--out", tmp_path / "m2", "--no-verify") == 0
    (tmp_path / "m2" / "old.txt").write_text("from the previous merge")
    assert merge("--adapter", adapter, "--out", tmp_path / "m2", "--no-verify", "--overwrite") == 0
    assert not (tmp_path / "m2" / "old.txt").exists() and (tmp_path / "m2" / "merge_report.json").exists()
    assert leftovers(tmp_path, "m2") == []


def test_fp16_overflow_is_refused(tmp_path, capsys):
    base = tiny_llama(seed=0, vocab=VOCAB)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[3, :] *= 1e7  # a row far beyond fp16's 65504 after merging
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, EdoraConfig(r=4, target_modules=["down_proj"], seed=3))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    rc, err = refused(capsys, "--adapter", tmp_path / "adapter", "--base", tmp_path / "base", "--out",
                      tmp_path / "m", "--dtype", "float16")
    assert rc == 2 and "float16" in err and "down_proj" in err and "--dtype bfloat16" in err
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "m") == []


@pytest.mark.parametrize("case", ["missing", "no_config", "ia3", "no_weights"])
def test_bad_adapter_dirs(tmp_path, capsys, case):
    d = tmp_path / "adapter"
    if case != "missing":
        d.mkdir()
    if case == "ia3":
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
        (d / "adapter_model.safetensors").write_bytes(b"")
    if case == "no_weights":
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "EDORA", "r": 4}))
    rc, err = refused(capsys, "--adapter", d, "--base", tmp_path)
    want = {"missing": "does not exist", "no_config": "adapter_config.json is missing", "ia3": "'IA3' adapter",
            "no_weights": "no adapter_model.safetensors"}[case]
    assert rc == 2 and want in err


def test_into_dequantized_needs_4bit_training_info(run_dir, tmp_path, capsys):
    base, adapter, *_ = run_dir
    rc, err = refused(capsys, "--adapter", adapter, "--out", tmp_path / "m", "--into", "dequantized")
    assert rc == 2 and "edora_meta.json" in err


def test_failed_verification_keeps_a_rejected_dir_only(run_dir, tmp_path, capsys, monkeypatch):
    import pipeline.merging.verify

    base, adapter, *_ = run_dir
    monkeypatch.setitem(pipeline.merging.verify.TOLERANCES, "bfloat16", 0.0)
    rc, err = refused(capsys, "--adapter", adapter, "--out", tmp_path / "m", "--dtype", "bfloat16")
    assert rc == 2 and "verification failed" in err and "m.rejected" in err
    assert not (tmp_path / "m").exists() and (tmp_path / "m.rejected" / "merge_report.json").exists()


def test_interrupted_merge_leaves_nothing(run_dir, tmp_path, monkeypatch):
    from pipeline.merging import st_io

    base, adapter, *_ = run_dir
    calls = {"n": 0}
    real = st_io.ShardWriter.write

    def flaky(self, name, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(self, name, t)

    monkeypatch.setattr(st_io.ShardWriter, "write", flaky)
    assert merge("--adapter", adapter, "--out", tmp_path / "m", "--no-verify") == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_through_python_dash_m(run_dir, tmp_path):
    base, adapter, *_ = run_dir
    out = subprocess.run([sys.executable, "-m", "pipeline", "merge", "--adapter", str(adapter), "--out",
                          str(tmp_path / "m"), "--dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(str(tmp_path / "m"))
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["command"][:3] == ["python", "-m", "pipeline"] or report["command"][1:3] == ["-m", "pipeline"]


# ---- a real small model ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_merge_verifies(smollm2_dir, tmp_path, dtype):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = get_peft_model(base, EdoraConfig(r=8, target_modules=ALL_LINEAR, seed=0))
    perturb(model, sigma=0.02)
    model.save_pretrained(tmp_path / "adapter")
    del model, base
    assert merge("--adapter", tmp_path / "adapter", "--base", smollm2_dir, "--out", tmp_path / "m", "--dtype",
                 dtype) == 0
    v = json.loads((tmp_path / "m" / "merge_report.json").read_text())["verification"]
    assert v["passed"] and v["prompt_kind"] == "text"
    assert v["comparisons"]["adapter"]["argmax_agreement"] > (0.999 if dtype == "float32" else 0.9)
