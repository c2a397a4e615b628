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
    paired = json.loads(results.with_name("res_compare.json").read_text())  # pipeline compare over the rows
    assert [m["label"] for m in paired["models"]] == ["base", "edora", "full"]
    assert {(p["a"], p["b"]) for p in paired["pairs"]} >= {("base", "edora"), ("base", "full"), ("edora", "full")}

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "start" not in second.stdout  # nothing retrained or re-evaluated
    assert json.loads(results.read_text())["train"] == rows


def _train_entry(row, lr, loss):
    return {"row": row, "method": row, "lr": lr, "overrides": {}, "status": "ok", "wall_s": 10.0, "trainable": 1000,
            "steps": 3, "loss_curve": [[1, 2.0], [3, loss]], "heldout_curve": [[3, loss]], "heldout_loss": loss,
            "tokens_per_s": 100.0, "peak_gpu_gib": None, "train_runtime_s": 9.0}


def _sweep(tmp_path):
    """A finished sweep's results: edora's grid picks its top lr, lora's its bottom one (args_for's grids)."""
    res = mc.load_results(tmp_path / "none.json", args_for(tmp_path))
    res["train"] = {"edora-lr0.001": _train_entry("edora", 1e-3, 1.3), "edora-lr0.004": _train_entry("edora", 4e-3, 1.1),
                    "lora-lr0.0001": _train_entry("lora", 1e-4, 0.9), "lora-lr0.001": _train_entry("lora", 1e-3, 1.0)}
    res["selected"] = mc.selected(res, args_for(tmp_path))
    return res


def test_a_chosen_lr_at_the_grid_edge_is_flagged(tmp_path):
    res = _sweep(tmp_path)
    res["train"]["dora-lr0.0001"] = _train_entry("dora", 1e-4, 1.2)
    res["train"]["dora-lr0.0004"] = _train_entry("dora", 4e-4, 1.0)
    res["train"]["dora-lr0.0016"] = _train_entry("dora", 1.6e-3, 1.1)
    res["selected"]["dora"] = "dora-lr0.0004"  # inside its grid: no note
    assert res["selected"] == {"edora": "edora-lr0.004", "lora": "lora-lr0.0001", "dora": "dora-lr0.0004"}
    notes = mc.lr_edges(res)
    # one more step of each grid's own spacing beyond the edge: 4e-3 * 4, 1e-4 / 10
    assert notes == {
        "edora": "edora: lr at the grid's top edge (0.004 of 0.001, 0.004): widen the grid, e.g. --lrs "
                 "'edora=0.001:0.004:0.016'",
        "lora": "lora: lr at the grid's bottom edge (0.0001 of 0.0001, 0.001): widen the grid, e.g. --lrs "
                "'lora=1e-05:0.0001:0.001'"}
    mc.write_report(res, tmp_path / "r")
    md = (tmp_path / "r.md").read_text()
    assert "| edora | edora | 0.004* edge |" in md and "| lora | lora | 0.0001* edge |" in md
    assert "| dora | dora | 0.0004* |" in md and "| edora | edora | 0.001 |" in md
    assert f"- {notes['edora']}" in md and f"- {notes['lora']}" in md and "- dora: lr at" not in md


def _eval_dir(tmp_path, out, task, data, right):
    """A real eval dir: `pipeline eval` grading saved completions that are right on the ids in `right`."""
    from pipeline.cli import main as cli_main

    n = sum(1 for _ in open(data))
    preds = tmp_path / f"preds-{out.parent.name}-{out.name}.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "completion": f"The answer is: {i + 2 if i in right else -1}"})
                             + "\n" for i in range(n)))
    assert cli_main(["eval", "--tasks", task, "--predictions", str(preds), "--data-file", f"{task}={data}",
                     "--out", str(out)]) == 0


def test_export_packs_the_evals_into_one_archive_and_report_compares_them(tmp_path, capsys):
    """A GPU call writes the results and one archive of the eval dirs to --export; its disk is then lost; locally
    `--phase report --evals-archive` unpacks the archive and writes the paired comparison of the rows."""
    import tarfile

    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"{i}+2?", "answer": f"#### {i + 2}"}) + "\n" for i in range(20)))
    math = tmp_path / "math.jsonl"
    math.write_text("".join(json.dumps({"problem": f"{i}+2?", "answer": str(i + 2)}) + "\n" for i in range(5)))
    res = _sweep(tmp_path)
    work = tmp_path / "gpu-tmp"
    right = {"base": (set(range(2)), {0}), "edora": (set(range(10)), {0, 1, 2}), "lora": (set(range(2, 9)), {4})}
    res["eval"] = {}
    for row, (g_right, m_right) in right.items():
        job = res["selected"].get(row, "base")
        for set_name, task, data, ids in (("gsm8k", "gsm8k", gsm, g_right), ("math500", "math", math, m_right)):
            _eval_dir(tmp_path, work / job / f"eval-{set_name}", task, data, ids)
            s = json.loads((work / job / f"eval-{set_name}" / "summary.json").read_text())
            t = s["tasks"][task]  # the entry eval_jobs records
            res["eval"][f"{row}/{set_name}"] = {"row": row, "set": set_name, "job": job, "status": "ok", "n": t["n"],
                                                "accuracy": t["accuracy"], "correct": t["correct"],
                                                "no_answer": t["invalid"], "sampling": s["sampling"],
                                                "backend": s["backend"]}
    results = tmp_path / "out" / "method_compare_t.json"
    mc.save_results(results, res)
    base_args = ["--model", str(tmp_path / "model"), "--label", "t", "--train-data", "a.jsonl,b.jsonl", "--methods",
                 "base,edora,lora", "--lrs", "edora=1e-3:4e-3;lora=1e-4:1e-3", "--phase", "report"]
    out = tmp_path / "OUT"
    assert mc.main(base_args + ["--results", str(results), "--work", str(work), "--export", str(out)]) == 0
    archive = out / "method_compare_t_evals.tar.xz"
    assert sorted(p.name for p in out.iterdir()) == ["method_compare_t.json", "method_compare_t_evals.tar.xz"]
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for row, job in (("base", "base"), ("edora", "edora-lr0.004"), ("lora", "lora-lr0.0001")):
        for set_name in ("gsm8k", "math500"):
            for f in (work / job / f"eval-{set_name}").iterdir():
                assert f"{row}/eval-{set_name}/{f.name}" in names
    assert len(names) == sum(1 for _ in work.rglob("eval-*/*"))
    local = json.loads((tmp_path / "out" / "method_compare_t_compare.json").read_text())  # from --work, on the host

    import shutil

    shutil.rmtree(work)  # the GPU host's /tmp is gone; only $OUT came back
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(out / "method_compare_t.json", here)
    assert mc.main(base_args + ["--results", str(here / "method_compare_t.json"), "--work", str(tmp_path / "w"),
                                "--evals-archive", str(archive)]) == 0
    result = json.loads((here / "method_compare_t_compare.json").read_text())
    assert [m["label"] for m in result["models"]] == ["base", "edora", "lora"]
    cells = {(r["task"], r["metric"]): {k: (v["correct"], v["n"]) for k, v in r["models"].items()}
             for r in result["table"]}
    assert cells[("gsm8k", "strict")] == {"base": (2, 20), "edora": (10, 20), "lora": (7, 20)}
    assert cells[("math500", "math_verify")] == {"base": (1, 5), "edora": (3, 5), "lora": (1, 5)}
    pairs = {(p["task"], p["metric"], p["a"], p["b"]): p for p in result["pairs"]}
    p = pairs[("gsm8k", "strict", "base", "edora")]  # ids 2-9 right only for edora: McNemar 2 * (1/2)^8
    assert (p["n"], p["only_a"], p["only_b"], p["diff"], p["mcnemar_p"]) == (20, 0, 8, 0.4, 2 / 256)
    p = pairs[("gsm8k", "strict", "edora", "lora")]  # 0, 1, 9 only edora; none only lora
    assert (p["only_a"], p["only_b"], p["mcnemar_p"]) == (3, 0, 2 / 8)
    assert local["table"] == result["table"] and local["pairs"] == result["pairs"]
    assert (here / "method_compare_t_compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (here / "method_compare_t.md").read_text()
    assert "[method_compare_t_compare.md](method_compare_t_compare.md)" in md and "0.004* edge" in md
    capsys.readouterr()


def test_an_archive_with_other_paths_is_refused(tmp_path):
    import io
    import tarfile

    bad = tmp_path / "bad.tar.xz"
    with tarfile.open(bad, "w:xz") as tar:
        info = tarfile.TarInfo("../escape/eval-gsm8k/summary.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(SystemExit, match="unexpected entry '../escape"):
        mc.evals.unpack(bad, tmp_path / "dest")
    assert not (tmp_path / "escape").exists()
    with pytest.raises(SystemExit, match="no such file"):
        mc.evals.unpack(tmp_path / "missing.tar.xz", tmp_path / "dest")
