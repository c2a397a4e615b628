"""Run-dir guarantees (issue 14): one writer per run dir, a recipe change is never silently ignored (train --resume,
run), incomplete checkpoints are skipped, a ZeRO-3 recipe needs its launcher, the log says which rows do not train.
Each test reproduces a case that 84acf48 got wrong."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import gsm8k_rows, write_recipe
from tests_paths import ROOT

from pipeline.cli import main as cli
from pipeline.trainer import read_metrics


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):  # noqa: F811
    """A finished 2-step run (checkpoint-1, checkpoint-2) trained over a stale lock, on data with one row whose prompt
    alone is longer than max_length; returns (recipe path, run dir, log lines)."""
    root = tmp_path_factory.mktemp("runstate")
    rows = gsm8k_rows(24)
    rows.append({"question": "How many? " + "apples and pears " * 120, "answer": "1 + 1 = 2\n#### 2"})
    with open(root / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    recipe = write_recipe(tiny_setup, "r", root, data={"source": str(root / "data.jsonl")},
                          training={"max_steps": 2, "save_steps": 1, "save_total_limit": None})
    run = root / "runs" / "r"
    run.mkdir(parents=True)
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "time": 0, "command": "python -m pipeline train"}
    (run / ".lock").write_text(json.dumps(stale))
    handler, logger = Records(), logging.getLogger("pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        assert cli(["train", str(recipe)]) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return recipe, run, handler.lines, stale["pid"]


def test_a_stale_lock_is_named_and_taken_over(trained):
    recipe, run, lines, pid = trained
    assert any("stale lock" in line and f"pid {pid}" in line for line in lines), lines
    assert not (run / ".lock").exists()  # released at the end


def test_the_log_says_which_rows_do_not_train_and_why(trained):
    recipe, run, lines, _ = trained
    line = next(x for x in lines if x.startswith("data:"))
    assert "24 of 25 rows train" in line and "1 whose prompt alone fills max_length=256" in line, line
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["truncation"]["prompt_too_long"] == 1


def test_training_records_the_base_fingerprint_for_the_merge(trained):
    from pipeline.adapter_meta import AdapterMeta

    assert AdapterMeta.read(trained[1] / "adapter").base_fingerprint.startswith("sha256:")


def copy_run(trained, tmp_path):
    recipe, run, *_ = trained
    dst = tmp_path / "runs" / "r"
    shutil.copytree(run, dst)
    data = yaml.safe_load(recipe.read_text())
    data["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, dst


def test_a_second_writer_is_refused_with_the_owner_named(trained, tmp_path, capsys):
    recipe, run = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "time": 0, "command": "python -m pipeline train x"}
        (run / ".lock").write_text(json.dumps(lock))
        before = (run / "recipe.yaml").read_bytes()
        assert cli(["train", str(recipe), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and socket.gethostname() in err
        assert (run / "recipe.yaml").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("override", ["--training.learning_rate=0.001", "--adapter.r=8"])
def test_resume_with_a_changed_recipe_is_refused_before_anything_is_written(trained, tmp_path, capsys, override):
    recipe, run = copy_run(trained, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert cli(["train", str(recipe), "--resume", override]) == 2
    err = capsys.readouterr().err
    key = override[2:].split("=")[0]
    assert key in err and "--new-run" in err and "Nothing was written" in err
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_run_does_not_reuse_an_adapter_trained_with_another_recipe(trained, tmp_path, capsys):
    recipe, run = copy_run(trained, tmp_path)
    assert cli(["run", str(recipe), "--training.learning_rate=0.001", "--skip-eval"]) == 2
    assert "training.learning_rate" in capsys.readouterr().err
    assert not (run / "merged").exists()


def test_new_run_trains_the_changed_recipe_beside_the_old_one(trained, tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runstate import check_recipe

    recipe, run = copy_run(trained, tmp_path)
    changed = load_recipe(recipe, ["--training.learning_rate=0.001"])
    new = check_recipe(changed, new_run=True)
    assert re.fullmatch(r"r-[0-9a-f]{8}", new.name) and new.training.learning_rate == 0.001
    assert new.run_dir == run.parent / new.name and not new.run_dir.exists()
    assert check_recipe(changed, new_run=True).name == new.name  # every rank, every rerun: the same dir
    assert check_recipe(load_recipe(recipe, ["--training.learning_rate=0.002"]), new_run=True).name != new.name
    same = load_recipe(recipe, ["--training.logging_steps=7"])  # bookkeeping only: the same run continues
    assert check_recipe(same, new_run=True).name == "r"


def test_resume_skips_an_incomplete_checkpoint(trained, tmp_path):
    recipe, run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoint-2")
    (run / "checkpoint-2").mkdir()  # a kill during the save of step 2
    (run / "checkpoint-2" / "adapter_config.json").write_text("{}")
    assert cli(["train", str(recipe), "--resume"]) == 0
    assert (run / "incomplete-checkpoint-2").is_dir() and (run / "adapter" / "adapter_model.safetensors").exists()
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 2


def test_zero3_recipe_without_accelerate_is_an_error_with_the_command(tiny_setup, tmp_path, capsys):  # noqa: F811
    recipe = write_recipe(tiny_setup, "z", tmp_path,
                          launcher={"accelerate_config": str(ROOT / "recipes/accelerate/zero3-cpu.yaml"),
                                    "num_processes": 2})
    env_before = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    try:
        assert cli(["train", str(recipe)]) == 2
    finally:
        if env_before is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = env_before
    err = capsys.readouterr().err
    assert "accelerate launch --config_file" in err and "--num_processes 2" in err
    assert not (tmp_path / "runs" / "z").exists()


def test_run_holds_the_lock_for_every_stage(trained, tmp_path, capsys):
    """`run` (not only its training stage) is refused while another process holds the run dir: no merge, no eval."""
    recipe, run = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "time": 0, "command": "python -m pipeline run x"}
        (run / ".lock").write_text(json.dumps(lock))
        before = sorted(p.name for p in run.iterdir())
        assert cli(["run", str(recipe), "--skip-eval"]) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == before  # no merged/, no eval dirs
    finally:
        holder.kill()
        holder.wait()
