"""`pipeline serve` refusals and dry run; `pipeline run` end to end on a tiny model (transformers eval backend)."""

import importlib.util
import json

import pytest
import yaml
from helpers import tiny_llama, tiny_run_root, write_recipe

from pipeline.cli import main as cli_main


def test_serve_refuses_an_adapter_dir(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2
    assert "merge it first" in capsys.readouterr().err.lower()


def test_serve_refuses_a_dir_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_serve_dry_run_prints_the_vllm_command(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    assert cli_main(["serve", "--model", str(tmp_path), "--port", "8123", "--tensor-parallel-size", "2",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]  # (DeepSpeed prints a CPU warning to stdout first)
    assert out.startswith("vllm serve ") and "--port 8123" in out and "--tensor-parallel-size 2" in out


def test_serve_names_a_dependency_missing_from_vllms_environment(tmp_path, capsys, monkeypatch):
    # what a wheel-staged vLLM 0.26 did on the GPU host: its API server imports jmespath, which was not installed
    import importlib
    import os
    import shutil


    tiny_llama().save_pretrained(tmp_path)
    real_import = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "vllm.entrypoints.openai.api_server":
            raise ModuleNotFoundError("No module named 'jmespath'", name="jmespath")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/vllm")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("must not start the server"))
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be imported" in err and "pip install jmespath" in err


def test_run_trains_merges_evaluates_and_reports(tmp_path):
    root = tiny_run_root(tmp_path / "setup", 24)
    recipe = write_recipe(root, "e2e", tmp_path, training={"max_steps": 3})
    assert cli_main(["run", str(recipe), "--backend", "hf", "--tasks", "gsm8k", "--limit", "2", "--max-tokens", "8",
                     "--merge-dtype", "float32", "--data-file", f"gsm8k={root / 'gsm8k.jsonl'}", "--baseline",
                     "--gold-loss", "--name", "e2e"]) == 0
    run = tmp_path / "runs" / "e2e"
    # the base model first, then the fine-tuned one, on the same problems; the report puts them side by side
    base = json.loads((run / "eval-base/summary.json").read_text())["tasks"]["gsm8k"]
    after = json.loads((run / "eval/summary.json").read_text())["tasks"]["gsm8k"]
    assert base["n"] == after["n"] == 2 and base["gold_loss"]["n"] == after["gold_loss"]["n"] == 2
    assert base["gold_loss"]["loss"] != after["gold_loss"]["loss"]  # training moved the gold solutions' loss
    text = (run / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| gsm8k loss of the gold solutions"))
    b, a = base["gold_loss"]["loss"], after["gold_loss"]["loss"]
    assert row == f"| gsm8k loss of the gold solutions (nats/token, teacher-forced) | {b:.4f} | {a:.4f} | {a - b:+.4f} |"
    assert "| gsm8k accuracy, strict | 0.0% (0/2) | 0.0% (0/2) | +0.0 pts |" in text  # a random tiny model
    assert "No problem was solved before or after" in text
    assert (run / "before_after.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run / "merged" / "merge_report.json").read_text())["verification"]["passed"] is True
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert "gsm8k" in summary["tasks"]
    report = (run / "report.md").read_text()
    assert "## Training" in report and "## Merge" in report and "## Evaluation" in report
    # a second run resumes: nothing to redo, same report
    assert cli_main(["run", str(recipe), "--backend", "hf", "--tasks", "gsm8k", "--limit", "2", "--max-tokens", "8",
                     "--data-file", f"gsm8k={root / 'gsm8k.jsonl'}"]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["name"] == "e2e"


def test_run_checks_the_eval_inputs_before_training(tmp_path, capsys):
    root = tiny_run_root(tmp_path / "setup", 8)
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"question": "no answer field"}) + "\n")
    recipe = write_recipe(root, "pre", tmp_path)
    assert cli_main(["run", str(recipe), "--tasks", "gsm8k", "--backend", "vllm", "--data-file", f"gsm8k={bad}"]) == 2
    err = capsys.readouterr().err
    assert "nothing was trained" in err and f"{bad}:1: not a gsm8k row" in err
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM is not installed here" in err and "use --backend hf" in err
    assert not (tmp_path / "runs" / "pre").exists()

