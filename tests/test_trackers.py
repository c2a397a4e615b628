"""Trackers: `training.report_to` takes transformers' names (a list too); a W&B run in offline mode (the real
`wandb` package) gets the training metrics and, after `pipeline run`'s eval, the eval accuracies."""

import json

import pytest
import yaml
from helpers import tiny_run_root, write_recipe
from tests_paths import ROOT

from pipeline import trackers
from pipeline.cli import main as cli_main
from pipeline.recipe import RecipeError, load_recipe

RECIPE = "recipes/smollm2-135m/edora-gsm8k-cpu.yaml"


def test_tracker_names_match_transformers():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(trackers.TRACKERS) == set(INTEGRATION_TO_CALLBACK) == set(trackers.MODULES)


@pytest.mark.parametrize("value", ["none", "tensorboard", "wandb", ["wandb", "tensorboard"]])
def test_report_to_accepts_names_and_lists(value):
    recipe = load_recipe(RECIPE, [f"--training.report_to={json.dumps(value)}"])
    assert recipe.training.report_to == value
    assert recipe.sft_config_kwargs()["report_to"] == value


def test_report_to_errors_name_the_fix():
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, ['--training.report_to=["wandb", "tensorbaord"]'])
    assert "unknown tracker 'tensorbaord'; choose from none, all" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, ['--training.report_to=["none", "wandb"]'])
    assert "'none' cannot be combined" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, ["--training.report_to=dvclive"])  # a real tracker whose package is not installed
    assert "needs the 'dvclive' package: pip install dvclive" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, ["--training.report_to=3"])
    assert "training.report_to: got 3; expected a string or a list of a string" in str(e.value)


def test_eval_metrics_from_a_summary():
    summary = {"tasks": {"gsm8k": {"n": 2, "invalid": 1, "accuracy": {"strict": 0.5, "flexible": 1.0}}}}
    assert trackers.eval_metrics(summary) == {"eval/gsm8k/strict": 0.5, "eval/gsm8k/flexible": 1.0,
                                              "eval/gsm8k/n": 2, "eval/gsm8k/invalid": 1}


def wandb_records(path):
    """(kind, {key: value}) of the history and summary records in a W&B transaction log (`run-<id>.wandb`): a
    7-byte header, then LevelDB log blocks of 32 KiB whose records hold protobuf `Record`s (wandb's own format)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _crc, length, part = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and part == 0):
            pos += room  # block padding
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if part in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            kind = record.WhichOneof("record_type")
            if kind in ("history", "summary"):
                items = record.history.item if kind == "history" else record.summary.update
                out.append((kind, {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}))
    return out


@pytest.mark.slow  # ~15 s: W&B starts its service process twice
def test_wandb_offline_run_gets_training_and_eval_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "edora-test")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tiny_run_root(tmp_path / "setup", 24)
    recipe = write_recipe(root, "wb", tmp_path, training={"max_steps": 3, "report_to": ["wandb", "tensorboard"]})
    assert cli_main(["run", str(recipe), "--backend", "hf", "--tasks", "gsm8k", "--limit", "2", "--max-tokens", "8",
                     "--merge-dtype", "float32", "--data-file", f"gsm8k={root / 'gsm8k.jsonl'}"]) == 0
    run = tmp_path / "runs" / "wb"
    rec = json.loads((run / "trackers.json").read_text())
    assert rec["wandb"]["mode"] == "offline" and rec["wandb"]["project"] == "edora-test"
    assert rec["wandb"]["step"] == 3 and yaml.safe_load((run / "recipe.yaml").read_text())["training"][
        "report_to"] == ["wandb", "tensorboard"]
    run_id = rec["wandb"]["id"]
    # W&B's offline files, inside the run dir: one dir for training, one for the eval (same run id)
    dirs = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(dirs) == 2, list((run / "wandb").iterdir())
    train_log, eval_log = (wandb_records(d / f"run-{run_id}.wandb") for d in dirs)
    train_rows = [h for kind, h in train_log if kind == "history"]
    assert [r["train/global_step"] for r in train_rows if "train/loss" in r] == [1, 2, 3]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["train/loss"] for r in train_rows if "train/loss" in r] == [m["loss"] for m in metrics if "loss" in m]
    expected = trackers.eval_metrics(json.loads((run / "eval" / "summary.json").read_text()))
    eval_summary = {k: v for kind, s in eval_log if kind == "summary" for k, v in s.items()}
    assert "eval/gsm8k/strict" in expected and {k: eval_summary[k] for k in expected} == expected
    assert [h["train/global_step"] for kind, h in eval_log if kind == "history"] == [3]
    # TensorBoard: the training's event files plus the eval scalars
    events = list(run.rglob("events.out.tfevents.*"))
    assert len(events) >= 2


def _trackio_logs(trackio_dir, project, run):
    """The rows trackio stored for a run, read by trackio itself in a child process (it fixes its dir on import)."""
    import os
    import subprocess
    import sys

    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, project, run], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~45 s: a tiny training, merge and eval in a child process, then trackio in another
def test_mlflow_and_trackio_runs_get_training_and_eval_metrics(tmp_path):
    """report_to [mlflow, trackio] through `python -m pipeline run` (a child process, so trackio, which fixes its
    store when imported, writes under tmp_path): the real packages, offline; MLflow's store is inside the run dir; the
    eval after training lands in the same MLflow run and the same trackio run, read back by each package's reader."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    root = tiny_run_root(tmp_path / "setup", 24)
    recipe = write_recipe(root, "mt", tmp_path, training={"max_steps": 3, "report_to": ["mlflow", "trackio"]})
    cwd = tmp_path / "cwd"
    cwd.mkdir()  # nothing may land in the working directory (MLflow's default ./mlruns)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKIO_"))}
    env.update(TRACKIO_DIR=str(tmp_path / "trackio"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--backend", "hf", "--tasks", "gsm8k",
                           "--limit", "2", "--max-tokens", "8", "--merge-dtype", "float32", "--data-file",
                           f"gsm8k={root / 'gsm8k.jsonl'}"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "mt"
    rec = json.loads((run / "trackers.json").read_text())
    assert rec["mlflow"]["tracking_uri"] == f"sqlite:///{run / 'mlflow.db'}" and rec["mlflow"]["step"] == 3
    assert rec["trackio"] == {"project": "huggingface", "run": "mt", "dir": str(tmp_path / "trackio"), "step": 3}
    assert list(cwd.iterdir()) == []
    train_losses = [m["loss"] for m in (json.loads(line) for line in (run / "metrics.jsonl").open()) if "loss" in m]
    expected = trackers.eval_metrics(json.loads((run / "eval" / "summary.json").read_text()))
    assert "eval/gsm8k/strict" in expected

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=rec["mlflow"]["tracking_uri"])
    history = client.get_metric_history(rec["mlflow"]["run_id"], "loss")
    assert [(h.step, h.value) for h in history] == list(zip([1, 2, 3], train_losses))
    for key, value in expected.items():
        (point,) = client.get_metric_history(rec["mlflow"]["run_id"], key)
        assert (point.step, point.value) == (3, value)
    assert client.get_run(rec["mlflow"]["run_id"]).data.params["learning_rate"] == "0.02"

    logs = _trackio_logs(tmp_path / "trackio", "huggingface", "mt")
    assert [(r["train/global_step"], r["train/loss"]) for r in logs if "train/loss" in r] == list(
        zip([1, 2, 3], train_losses))
    (last,) = [r for r in logs if "eval/gsm8k/strict" in r]
    assert {k: last[k] for k in expected} == expected and last["train/global_step"] == 3
    # a later `pipeline eval` in a process whose trackio points elsewhere (here: none imported, or the default
    # store): the child process writes to the recorded dir
    trackers.log_trackio(rec["trackio"], {"eval/x/strict": 0.25})
    (row,) = [r for r in _trackio_logs(tmp_path / "trackio", "huggingface", "mt") if "eval/x/strict" in r]
    assert (row["eval/x/strict"], row["train/global_step"]) == (0.25, 3)


def test_tracker_extras_are_exact_pins_of_the_tested_versions():
    """pyproject's mlflow and trackio extras: exact pins, and the versions installed here (the ones the slow test
    ran with) are those pins."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import PackageNotFoundError, version

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker, extra in trackers.EXTRAS.items():
        assert extras[extra] and all("==" in pin for pin in extras[extra]), (tracker, extras.get(extra))
        for pin in extras[extra]:
            name, _, wanted = pin.partition("==")
            try:
                assert version(name) == wanted, pin
            except PackageNotFoundError:
                pass  # not installed here: the slow test skips
