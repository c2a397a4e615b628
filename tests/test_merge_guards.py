"""Merge guarantees (issue 14): --out never replaces a run, a base or the adapter; verification that does not trust
the adapter as loaded (tensor types, base fingerprint, the formula on the written weights, no-op merges); damaged
files and stale work dirs. Each test reproduces a case that 84acf48 got wrong."""

import json
import shutil
import subprocess

import pytest
import torch
from helpers import VOCAB, make_run, tiny_llama
from safetensors.torch import load_file, save_file

from pipeline.adapter_meta import AdapterMeta
from pipeline.cli import main as cli


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    base, adapter, *_ = make_run(root)
    run = adapter.parent
    for name in ("recipe.yaml", "metrics.jsonl"):  # what a training run holds beside its adapter
        (run / name).write_text("kept\n")
    return base, adapter


def merge(capsys, *args):
    rc = cli(["merge", *map(str, args)])
    return rc, capsys.readouterr().err


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["run", "base", "parent"])
def test_out_never_replaces_a_run_a_base_or_the_adapter(made, capsys, target):
    base, adapter = made
    out = {"run": adapter.parent, "base": base, "parent": base.parent}[target]
    before = snapshot(base.parent)
    rc, err = merge(capsys, "--adapter", adapter, "--out", out, "--overwrite", "--no-verify")
    assert rc == 2 and "choose another" in err.lower(), err
    assert snapshot(base.parent) == before  # nothing deleted, nothing added


def copy_adapter(adapter, dst):
    shutil.copytree(adapter, dst)
    return dst


def test_edited_peft_type_is_refused_not_merged_as_a_noop(made, tmp_path, capsys):
    base, adapter = made
    bad = copy_adapter(adapter, tmp_path / "adapter")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    rc, err = merge(capsys, "--adapter", bad, "--out", tmp_path / "m")
    assert rc == 2 and "peft_type LORA" in err and "EDoRA tensors" in err
    assert not (tmp_path / "m").exists()


def altered_base(base, tmp_path, how):
    model = tiny_llama(seed=0, vocab=VOCAB)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or "proj" not in name:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if how == "noise":  # 10% of each weight's spread
                p.add_(0.1 * p.std() * noise)
            else:  # other weights with the same row norms
                p.copy_(noise / noise.norm(dim=1, keepdim=True) * p.norm(dim=1, keepdim=True))
    model.save_pretrained(tmp_path / how)
    shutil.copy(base / "tokenizer.json", tmp_path / how / "tokenizer.json")
    return tmp_path / how


@pytest.mark.parametrize("how", ["noise", "equal_row_norms"])
def test_base_fingerprint_refuses_a_near_or_norm_equal_base(made, tmp_path, capsys, how):
    base, adapter = made
    other = altered_base(base, tmp_path, how)
    rc, err = merge(capsys, "--adapter", adapter, "--base", other, "--out", tmp_path / "m")
    assert rc == 2 and "different base model" in err and "fingerprint saved at training" in err, err
    assert not (tmp_path / "m").exists()


def test_corrupted_factor_bytes_fail_the_fingerprint(made, tmp_path, capsys):
    base, adapter = made
    bad = copy_adapter(adapter, tmp_path / "adapter")
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sd if k.endswith("q_proj.edora_A"))
    sd[key] = sd[key].clone()
    sd[key][0, :5] *= -3  # a few flipped values
    save_file(sd, bad / "adapter_model.safetensors")
    rc, err = merge(capsys, "--adapter", bad, "--out", tmp_path / "m")
    assert rc == 2 and "fingerprint" in err and "q_proj" in err


def test_truncated_adapter_file_is_one_line(made, tmp_path, capsys):
    base, adapter = made
    bad = copy_adapter(adapter, tmp_path / "adapter")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    rc, err = merge(capsys, "--adapter", bad, "--out", tmp_path / "m")
    assert rc == 2 and "truncated or damaged" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("path", ["streamed", "in_memory"])
def test_written_weights_are_checked_against_the_formula(made, tmp_path, capsys, monkeypatch, path):
    """A merge bug (here: the magnitude left out) is caught from the files even with --no-verify, on both merge
    paths (a safetensors base is streamed; a .bin base is merged in memory)."""
    from pipeline.edora import terms

    base, adapter = made
    if path == "in_memory":
        shutil.copytree(base, tmp_path / "base")
        torch.save(load_file(tmp_path / "base" / "model.safetensors"), tmp_path / "base" / "pytorch_model.bin")
        (tmp_path / "base" / "model.safetensors").unlink()
        base = tmp_path / "base"
    real = terms.merged_weight
    monkeypatch.setattr(terms, "merged_weight", lambda w0, a, b, r, m, s: real(w0, a, b, r, None, s))
    rc, err = merge(capsys, "--adapter", adapter, "--base", base, "--out", tmp_path / "m", "--no-verify")
    assert rc == 2 and "recomputed from the saved adapter" in err and not (tmp_path / "m").exists()
    monkeypatch.setattr(terms, "merged_weight", real)
    assert merge(capsys, "--adapter", adapter, "--base", base, "--out", tmp_path / "m", "--no-verify", "--dtype",
                 "float32")[0] == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["method"] == path and report["formula_max_rel_diff"] < 1e-5


def test_a_noop_merge_of_a_trained_adapter_is_an_error(made, tmp_path, capsys, monkeypatch):
    from pipeline.merging import stream

    monkeypatch.setattr(stream, "merge_weight", lambda module, w0, adapter, into, stats: w0.float())
    rc, err = merge(capsys, "--adapter", made[1], "--out", tmp_path / "m", "--no-verify")
    assert rc == 2 and "no-op merge" in err and not (tmp_path / "m").exists()


def test_stale_partial_dirs_are_removed_by_the_next_merge(made, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    assert cli(["merge", "--adapter", str(made[1]), "--out", str(tmp_path / "m"), "--no-verify"]) == 0
    assert not stale.exists() and (tmp_path / "m" / "merge_report.json").exists()
    assert f"left by a merge that was killed (pid {dead.pid})" in caplog.text
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["formula_max_rel_diff"] < 1e-5 and report["stats"]["weights_changed"] == 14


def test_a_lora_adapter_on_a_wrong_base_is_refused_by_the_training_fingerprint(made, tmp_path, capsys):
    """LoRA carries no fingerprint of its base: training records one (edora_meta.json) and the merge checks it."""
    from peft import LoraConfig, get_peft_model

    from pipeline.merging.checks import training_fingerprint

    base, _ = made
    model = get_peft_model(tiny_llama(seed=0, vocab=VOCAB), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "lora")
    meta = AdapterMeta(base_model=str(base),
                       base_fingerprint=training_fingerprint(str(base), tmp_path / "lora" / "adapter_model.safetensors"))
    assert meta.base_fingerprint.startswith("sha256:")
    meta.write(tmp_path / "lora")
    other = altered_base(base, tmp_path, "noise")
    rc, err = merge(capsys, "--adapter", tmp_path / "lora", "--base", other, "--out", tmp_path / "m")
    assert rc == 2 and "recorded at training" in err and not (tmp_path / "m").exists()
    assert merge(capsys, "--adapter", tmp_path / "lora", "--base", base, "--out", tmp_path / "m", "--no-verify")[0] == 0
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["base_fingerprint"]["checked"] is True


def test_every_saved_lora_tensor_must_be_used(made, tmp_path, capsys):
    """Tensors PEFT does not load (here renamed so no module matches) used to be skipped with a warning: the merge
    then wrote the base unchanged and verified it against the same, equally incomplete, adapter."""
    from peft import LoraConfig, get_peft_model

    base, _ = made
    model = get_peft_model(tiny_llama(seed=0, vocab=VOCAB), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    path = tmp_path / "lora" / "adapter_model.safetensors"
    sd = load_file(path)
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v for k, v in sd.items()}, path)
    rc, err = merge(capsys, "--adapter", tmp_path / "lora", "--out", tmp_path / "m")
    assert rc == 2 and "PEFT did not use 2 tensor(s)" in err and "qq_proj" in err
    assert not (tmp_path / "m").exists()
