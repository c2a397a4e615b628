"""benchmarks/method_compare.py: learning rate chosen on held-out loss, finished rows kept and skipped, resume."""

import importlib.util
import json
import subprocess
import sys

import pytest
from tests_paths import ROOT

spec = importlib.util.spec_from_file_location("method_compare", ROOT / "benchmarks" / "method_compare.py")
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)


def args_for(tmp_path, *extra):
    return mc.parse_args(["--model", str(tmp_path / "model"), "--label", "t", "--train-data", "a.jsonl,b.jsonl",
                          "--methods", "base,edora,lora", "--lrs", "edora=1e-3:4e-3;lora=1e-4:1e-3", *extra])


def test_selection_takes_the_lowest_heldout_loss_of_complete_grids(tmp_path):
    args = args_for(tmp_path)
    res = {"train": {"edora-lr0.001": {"status": "ok", "heldout_loss": 1.20, "lr": 1e-3},
                     "edora-lr0.004": {"status": "ok", "heldout_loss": 1.10, "lr": 4e-3},
                     "lora-lr0.0001": {"status": "ok", "heldout_loss": 0.90, "lr": 1e-4},
                     "lora-lr0.001": {"status": "failed (1)", "lr": 1e-3}}}
    # lora's grid is incomplete: no choice is made for it (a partial sweep never picks by default)
    assert mc.selected(res, args) == {"edora": "edora-lr0.004"}
    res["train"]["lora-lr0.001"] = {"status": "ok", "heldout_loss": 0.95, "lr": 1e-3}
    assert mc.selected(res, args) == {"edora": "edora-lr0.004", "lora": "lora-lr0.0001"}


def test_a_results_file_from_other_settings_is_refused(tmp_path):
    path = tmp_path / "r.json"
    mc.save_results(path, mc.load_results(path, args_for(tmp_path)))
    assert mc.load_results(path, args_for(tmp_path))["train"] == {}
    with pytest.raises(SystemExit, match="other settings"):
        mc.load_results(path, args_for(tmp_path, "--rank", "8"))


def test_train_row_is_read_from_the_run_records(tmp_path):
    rows = [{"step": 5, "loss": 2.0, "tokens_per_second": 100.0}, {"step": 10, "loss": 1.5, "tokens_per_second": 300.0},
            {"step": 10, "eval_loss": 1.7}, {"step": 12, "loss": 1.4, "tokens_per_second": 200.0},
            {"step": 12, "eval_loss": 1.6}, {"step": 12, "train_runtime": 9.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = mc.read_train_row(tmp_path, "x INFO trainable parameters: 15,232 of 1,000,000 (1.5%)\n")
    assert row["trainable"] == 15232 and row["steps"] == 12 and row["heldout_loss"] == 1.6
    assert row["loss_curve"] == [[5, 2.0], [10, 1.5], [12, 1.4]] and row["heldout_curve"] == [[10, 1.7], [12, 1.6]]
    assert row["tokens_per_s"] == 200.0 and row["train_runtime_s"] == 9.5  # the median of the logged speeds


@pytest.mark.slow
def test_sweep_runs_through_the_cli_then_resumes_without_redoing_rows(tmp_path):
    """Tiny random model: 2 learning rates of EDoRA + base, trained, chosen, merged and evaluated by the real CLI;
    a second call finds every row done and starts nothing."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_llama, tiny_tokenizer

    tiny_llama(seed=0, vocab=300).save_pretrained(tmp_path / "model")
    tiny_tokenizer(tmp_path / "model")
    with open(tmp_path / "g.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"Tom has {i} apples and buys 3. How many?",
                                "answer": f"{i} + 3 = <<{i}+3={i + 3}>>{i + 3}\n#### {i + 3}"}) + "\n")
    with open(tmp_path / "m.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"problem": f"What is {i}+1?", "solution": f"It is $\\boxed{{{i + 1}}}$."}) + "\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"question": f"{i}+2?", "answer": f"#### {i + 2}"}) + "\n"
                                              for i in range(3)))
    results = tmp_path / "res.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "method_compare.py"), "--model", str(tmp_path / "model"),
           "--label", "t", "--train-data", f"{tmp_path / 'g.jsonl'},{tmp_path / 'm.jsonl'}",
           "--eval-data", f"gsm8k={tmp_path / 't.jsonl'}", "--methods", "base,edora,full", "--lrs", "edora=1e-3:2e-2;full=1e-4",
           "--heldout", "8", "--batch", "8", "--max-steps", "3", "--max-length", "96", "--parallel", "2",
           "--work", str(tmp_path / "runs"), "--results", str(results), "--eval-max-tokens", "4",
           "--eval-batch-size", "4"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    res = json.loads(results.read_text())
    rows = res["train"]
    assert set(rows) == {"edora-lr0.001", "edora-lr0.02", "full-lr0.0001"}
    assert all(r["status"] == "ok" for r in rows.values())
    total = sum(p.numel() for p in tiny_llama(seed=0, vocab=300).parameters())
    assert rows["full-lr0.0001"]["trainable"] == total > rows["edora-lr0.001"]["trainable"]
    losses = {}
    for name in rows:  # the chosen lr is the one whose final held-out loss (from the run's own records) is lowest
        records = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
        assert rows[name]["heldout_loss"] == losses[name] and rows[name]["steps"] == 3
    edora = {k: v for k, v in losses.items() if k.startswith("edora")}
    assert res["selected"] == {"edora": min(edora, key=edora.get), "full": "full-lr0.0001"}
    assert set(res["eval"]) == {"base/gsm8k", "edora/gsm8k", "full/gsm8k"}
    assert all(e["status"] == "ok" and e["n"] == 3 for e in res["eval"].values())
    assert (tmp_path / "runs" / res["selected"]["edora"] / "merged" / "merge_report.json").exists()
    assert results.with_suffix(".md").exists() and results.with_suffix(".png").exists()

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "start" not in second.stdout  # nothing retrained or re-evaluated
    assert json.loads(results.read_text())["train"] == rows
