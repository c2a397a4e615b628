"""`python -m pipeline compare`: statistics pinned by hand, and the command on real eval dirs made by `pipeline eval`
(grading saved completions) in a run-dir and a plain eval-dir layout."""

import json
import math

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.compare import mcnemar_exact, paired, paired_bootstrap

ROWS = [{"question": f"What is {i} + 0?", "answer": f"{i} + 0 = {i}\n#### {i}"} for i in range(20)]


def test_mcnemar_exact_by_hand():
    # b = 1, c = 9: n = 10, P(X <= 1) = (C(10,0) + C(10,1)) / 2^10 = 11/1024, two-sided 22/1024
    assert mcnemar_exact(1, 9) == 22 / 1024 == mcnemar_exact(9, 1)
    assert mcnemar_exact(0, 6) == 2 / 64
    # b = 5, c = 10: 2 * (1 + 15 + 105 + 455 + 1365 + 3003) / 2^15
    assert mcnemar_exact(5, 10) == 2 * 4944 / 32768
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped at 1; no discordant pairs
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 9), (5, 10), (12, 30), (0, 6)]:
        assert math.isclose(mcnemar_exact(b, c), scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel_tol=1e-12)


def test_paired_bootstrap_matches_resampling_and_the_normal_interval():
    a = [0] * 50 + [1] * 50
    b = [1] * 60 + [0] * 40  # 50 pairs only B right, 40 only A right, 10 both: diff = +0.10
    lo, hi = paired_bootstrap(a, b)
    assert paired_bootstrap(a, b) == (lo, hi)  # seeded: the same numbers every run
    # the normal approximation: mean 0.1, var of a pair's difference 0.9 - 0.01 = 0.89
    half = 1.96 * math.sqrt(0.89 / 100)
    assert abs(lo - (0.1 - half)) < 0.015 and abs(hi - (0.1 + half)) < 0.015
    # resampling indices directly (what the multinomial shortcut stands for)
    diff = np.array(b) - np.array(a)
    idx = np.random.default_rng(1).integers(0, 100, size=(10_000, 100))
    direct = np.percentile(diff[idx].mean(axis=1), [2.5, 97.5])
    assert abs(direct[0] - lo) <= 0.011 and abs(direct[1] - hi) <= 0.011
    assert paired_bootstrap([0, 1, 1], [1, 1, 1]) != (0.0, 0.0)
    assert paired_bootstrap([1] * 10, [1] * 10) == (0.0, 0.0)  # identical results: no spread
    assert paired_bootstrap([0] * 10, [1] * 10) == (1.0, 1.0)


def test_paired_skips_problems_that_differ():
    a = {"1": {"question": "q1", "gold": 1, "scores": {"s": 1}}, "2": {"question": "q2", "gold": 2, "scores": {"s": 0}}}
    b = {"1": {"question": "q1", "gold": 1, "scores": {"s": 0}}, "2": {"question": "other", "gold": 2,
                                                                      "scores": {"s": 1}}}
    note = paired(a, b, "s")
    assert (note["n"], note["only_a"], note["only_b"], note["diff"]) == (1, 1, 0, -1.0)


def _eval_dir(tmp_path, data, out, right: set[int]):
    """A real eval dir: `pipeline eval` grading completions that are right exactly on the ids in `right`."""
    preds = tmp_path / f"{out.name}-preds.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "completion": f"The answer is: {i if i in right else -1}"})
                             + "\n" for i in range(len(ROWS))))
    assert cli_main(["eval", "--tasks", "gsm8k", "--predictions", str(preds), "--data-file", f"gsm8k={data}",
                     "--out", str(out)]) == 0
    return out


def test_compare_cli_on_real_eval_dirs(tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    base = _eval_dir(tmp_path, data, tmp_path / "eval" / "base", set(range(10)))
    _eval_dir(tmp_path, data, tmp_path / "runs" / "edora" / "eval", set(range(16)))  # a run dir's eval/
    lora = _eval_dir(tmp_path, data, tmp_path / "eval" / "lora", set(range(5, 20)))
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(base), str(tmp_path / "runs" / "edora"), str(lora), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert [m["label"] for m in result["models"]] == ["base", "edora", "lora"]
    strict = next(r for r in result["table"] if (r["task"], r["metric"]) == ("gsm8k", "strict"))
    assert {k: (v["correct"], v["n"]) for k, v in strict["models"].items()} == {
        "base": (10, 20), "edora": (16, 20), "lora": (15, 20)}
    pairs = {(p["a"], p["b"]): p for p in result["pairs"] if p["metric"] == "strict"}
    assert set(pairs) == {("base", "edora"), ("base", "lora"), ("edora", "lora")}
    p = pairs[("base", "edora")]  # ids 10-15 right only for edora
    assert (p["n"], p["only_a"], p["only_b"], p["diff"], p["mcnemar_p"]) == (20, 0, 6, 0.3, 2 / 64)
    p = pairs[("base", "lora")]  # 0-4 only base, 10-19 only lora
    assert (p["only_a"], p["only_b"], p["diff"], p["mcnemar_p"]) == (5, 10, 0.25, 2 * 4944 / 32768)
    assert p["ci95"][0] < 0.25 < p["ci95"][1]
    md = (out / "compare.md").read_text()
    assert "| gsm8k | strict | 50.00% (10/20) | 80.00% (16/20) | 75.00% (15/20) |" in md
    assert "| gsm8k | strict | base | edora | 20 | +30.00 pts |" in md and "0.0312 |" in md
    assert md in printed
    assert (out / "compare.png").stat().st_size > 10_000


def test_compare_errors_name_the_fix(tmp_path, capsys):
    assert cli_main(["compare", str(tmp_path)]) == 2
    assert "no summary.json there" in capsys.readouterr().err
    assert cli_main(["compare", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_run_dirs_group_evals_by_model(tmp_path, capsys):
    """benchmarks/method_compare.py keeps one eval dir per set (eval-gsm8k, eval-math500) for one model: one column.
    A run dir holding the base model's eval beside the fine-tuned one's: two columns."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    math_data = tmp_path / "math.jsonl"
    math_data.write_text("".join(json.dumps({"problem": f"{i}/1?", "answer": str(i)}) + "\n" for i in range(4)))
    run = tmp_path / "runs" / "edora"
    _eval_dir(tmp_path, data, run / "eval-gsm8k", set(range(12)))
    preds = tmp_path / "m.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "completion": f"The answer is: {i if i < 3 else 9}"}) + "\n"
                             for i in range(4)))
    assert cli_main(["eval", "--tasks", "math", "--predictions", str(preds), "--data-file", f"math={math_data}",
                     "--out", str(run / "eval-math500")]) == 0
    # the eval dirs record the graded file as their model; make them one model, as method_compare's are
    for d in ("eval-gsm8k", "eval-math500"):
        summary = json.loads((run / d / "summary.json").read_text())
        (run / d / "summary.json").write_text(json.dumps({**summary, "model": "runs/edora/merged"}))
    demo = tmp_path / "runs" / "demo"
    _eval_dir(tmp_path, data, demo / "eval", set(range(8)))
    _eval_dir(tmp_path, data, demo / "eval_base", set(range(2)))
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(run), str(demo), "--out", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    # the base model's eval first (pairs read fine-tuned minus base)
    assert [m["label"] for m in result["models"]] == ["edora", "demo/base", "demo"]
    cells = {(r["task"], r["metric"]): {k: v["correct"] for k, v in r["models"].items()} for r in result["table"]}
    assert cells[("gsm8k", "strict")] == {"edora": 12, "demo": 8, "demo/base": 2}
    assert cells[("math", "math_verify")] == {"edora": 3}
    base_vs_ft = next(p for p in result["pairs"] if (p["a"], p["b"], p["metric"]) == ("demo/base", "demo", "strict"))
    assert (base_vs_ft["only_a"], base_vs_ft["only_b"], base_vs_ft["mcnemar_p"]) == (0, 6, 2 / 64)
    capsys.readouterr()


def test_run_report_compares_the_base_eval_with_the_fine_tuned_one(tmp_path, capsys):
    """The layout `pipeline run --baseline` leaves (runs/<name>/eval-base, runs/<name>/eval): the run's report gets
    the paired notes and compare.{md,png,json}, and `pipeline compare` renders the same two dirs."""
    from pipeline.run_report import write_report

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "runs" / "demo"
    _eval_dir(tmp_path, data, run / "eval-base", {0, 1})
    _eval_dir(tmp_path, data, run / "eval", set(range(8)))
    report = write_report(run, "demo").read_text()
    result = json.loads((run / "compare.json").read_text())
    assert [m["label"] for m in result["models"]] == ["base", "fine-tuned"]
    strict = next(p for p in result["pairs"] if p["metric"] == "strict")
    # ids 2-7 right only after fine-tuning: +6/20 = +30 pts, McNemar p = 2 * (1/2)^6
    assert (strict["n"], strict["only_a"], strict["only_b"], strict["diff"], strict["mcnemar_p"]) == (
        20, 0, 6, 0.3, 2 / 64)
    assert "## Is the change more than noise?" in report
    lo, hi = strict["ci95"]
    assert 0 < lo < 0.3 < hi <= 0.6
    assert f"| gsm8k | strict | 20 | +30.00 pts | [{100 * lo:+.2f}, {100 * hi:+.2f}] | 0 / 6 | 0.0312 |" in report
    assert (run / "compare.md").is_file() and (run / "compare.png").read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(run / "eval-base"), str(run / "eval"), "--out", str(out)]) == 0
    cli = json.loads((out / "compare.json").read_text())
    assert [m["label"] for m in cli["models"]] == ["demo/base", "demo"]
    assert [p["mcnemar_p"] for p in cli["pairs"]] == [p["mcnemar_p"] for p in result["pairs"]]
    assert cli_main(["compare", str(run), "--out", str(tmp_path / "cmp2")]) == 0  # the run dir itself: same columns
    assert [m["label"] for m in json.loads((tmp_path / "cmp2" / "compare.json").read_text())["models"]] == [
        "demo/base", "demo"]
    capsys.readouterr()
    # no baseline: no comparison
    solo = tmp_path / "runs" / "solo"
    _eval_dir(tmp_path, data, solo / "eval", {1})
    assert "noise" not in write_report(solo, "solo").read_text() and not (solo / "compare.json").exists()
