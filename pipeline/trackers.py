"""Experiment trackers: `training.report_to` names what transformers' Trainer reports to; when `pipeline eval` (or
`run`) evaluates runs/<name>/merged, the eval accuracies go to the same tracker run (W&B, MLflow, trackio and
TensorBoard).

Training metrics reach every tracker through transformers' own callbacks. This module only (1) checks the names and
that their packages are installed, (2) keeps the trackers' files inside the run dir unless the environment says
otherwise (W&B under runs/<name>/wandb, MLflow in the SQLite store runs/<name>/mlflow.db; trackio keeps its own
store, TRACKIO_DIR or ~/.cache/huggingface/trackio, where `trackio show` reads every project), (3) records which
tracker run the training wrote to (runs/<name>/trackers.json) and (4) logs eval results there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# transformers 5.23's INTEGRATION_TO_CALLBACK keys (tests/test_trackers.py checks they still match), plus its
# two special values.
TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
            "neptune", "swanlab", "tensorboard", "trackio", "wandb")
SPECIAL = ("none", "all")
# the module each tracker needs (transformers checks the same ones)
MODULES = {"azure_ml": "azureml", "clearml": "clearml", "codecarbon": "codecarbon", "comet_ml": "comet_ml",
           "dagshub": "dagshub", "dvclive": "dvclive", "flyte": "flytekit", "kubeflow": "kubeflow", "mlflow": "mlflow",
           "neptune": "neptune", "swanlab": "swanlab", "tensorboard": "tensorboard", "trackio": "trackio",
           "wandb": "wandb"}
RECORD_FILE = "trackers.json"
# pip extras of this project (pyproject.toml) that install a tracker at the version tested here
EXTRAS = {"mlflow": "mlflow", "trackio": "trackio"}


def names(report_to: str | list[str]) -> list[str]:
    """The trackers a `report_to` value selects (`none` -> [])."""
    values = [report_to] if isinstance(report_to, str) else list(report_to)
    return [] if values == ["none"] else [v for v in values if v != "none"]


def problems(report_to: str | list[str]) -> list[str]:
    """Every unknown name or missing package, each with its fix."""
    out = []
    values = [report_to] if isinstance(report_to, str) else list(report_to)
    for v in values:
        if v not in TRACKERS + SPECIAL:
            out.append(f"unknown tracker {v!r}; choose from {', '.join(SPECIAL + TRACKERS)} (or a list of them)")
        elif v in MODULES and importlib.util.find_spec(MODULES[v]) is None:
            how = (f"pip install -e '.[{EXTRAS[v]}]' (the tested version)" if v in EXTRAS else
                   f"pip install {v.replace('_', '-')}" + (" (requirements.txt pins it)" if v == "wandb" else ""))
            out.append(f"tracker {v!r} needs the {MODULES[v]!r} package: {how}")
        elif v == "mlflow" and _mlflow_store_here() and not all(importlib.util.find_spec(m) for m in
                                                                   ("sqlalchemy", "alembic")):
            # MLflow 3.17 refuses its plain-file store (maintenance mode); the run dir gets a SQLite store instead
            out.append("tracker 'mlflow' keeps its runs in runs/<name>/mlflow.db (SQLite), which needs the "
                       "'sqlalchemy' and 'alembic' packages: pip install -e '.[mlflow]', or point "
                       "MLFLOW_TRACKING_URI at your MLflow server")
    if "none" in values and len(values) > 1:
        out.append(f"{values}: 'none' cannot be combined with trackers; drop it or use report_to: none alone")
    return out


_SET_HERE: set[str] = set()  # variables this module set (a later run in the same process moves them)


def _mlflow_store_here() -> bool:
    """Whether MLflow's store will be the run dir's SQLite file (MLFLOW_TRACKING_URI unset, or set by prepare)."""
    return "MLFLOW_TRACKING_URI" not in os.environ or "MLFLOW_TRACKING_URI" in _SET_HERE


def prepare(run_dir: Path) -> None:
    """Keep tracker files inside the run dir unless the user already pointed them elsewhere.

    Not trackio's: it reads TRACKIO_DIR once, when imported, and TRL imports it with the trainer (before any run
    dir is known); record() writes down the dir it used."""
    run_dir = run_dir.resolve()
    for key, value in (("WANDB_DIR", str(run_dir)), ("MLFLOW_TRACKING_URI", f"sqlite:///{run_dir / 'mlflow.db'}")):
        if key not in os.environ or key in _SET_HERE:
            os.environ[key] = value
            _SET_HERE.add(key)


def record(run_dir: Path, trainer) -> dict:
    """After training: which tracker runs got the metrics (runs/<name>/trackers.json), then close W&B's run so the
    eval can reopen it."""
    rec: dict = {}
    selected = trainer.args.report_to or []
    if "wandb" in selected:
        import wandb

        if wandb.run is not None:
            rec["wandb"] = {"id": wandb.run.id, "project": wandb.run.project, "entity": wandb.run.entity,
                            "dir": os.environ.get("WANDB_DIR"), "mode": "offline" if wandb.run.offline else "online",
                            "step": trainer.state.global_step}
            wandb.finish()
    if "mlflow" in selected:
        import mlflow

        run = mlflow.last_active_run()  # transformers' callback ended it at the end of training
        if run is not None:
            rec["mlflow"] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                             "tracking_uri": mlflow.get_tracking_uri(), "step": trainer.state.global_step}
    if "trackio" in selected:
        import trackio.utils

        # transformers' callback opens the run by name (TrainingArguments.run_name) in TrainingArguments.project
        rec["trackio"] = {"project": trainer.args.project, "run": trainer.args.run_name,
                          "dir": str(trackio.utils.TRACKIO_DIR), "step": trainer.state.global_step}
    if "tensorboard" in selected:
        # the callback picks the dir (TENSORBOARD_LOGGING_DIR, else runs/<name>/runs/<date>_<host>)
        tb = [cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback"]
        if tb and getattr(tb[0], "logging_dir", None):
            rec["tensorboard"] = {"log_dir": str(tb[0].logging_dir), "step": trainer.state.global_step}
    if rec:
        (run_dir / RECORD_FILE).write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def eval_metrics(summary: dict) -> dict[str, float | int]:
    """eval/<task>/<metric> accuracies and eval/<task>/n, from an eval summary.json."""
    out: dict[str, float | int] = {}
    for task, t in summary.get("tasks", {}).items():
        for metric, acc in t["accuracy"].items():
            out[f"eval/{task}/{metric}"] = acc
        out[f"eval/{task}/n"] = t["n"]
        out[f"eval/{task}/invalid"] = t["invalid"]
    return out


def log_eval(run_dir: Path, summary: dict) -> list[str]:
    """Log an eval summary to the tracker runs the training recorded; returns the trackers written to."""
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return []
    rec = json.loads(path.read_text())
    metrics = eval_metrics(summary)
    done = []
    if "wandb" in rec and metrics:
        import wandb

        w = rec["wandb"]
        run = wandb.init(id=w["id"], project=w["project"], entity=w["entity"], dir=w["dir"], mode=w["mode"],
                         resume="allow")
        # transformers' WandbCallback plots against train/global_step, not W&B's own step counter
        run.log({**metrics, "train/global_step": w["step"]})
        run.summary.update(metrics)
        run.finish()
        done.append("wandb")
    if "mlflow" in rec and metrics:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        m = rec["mlflow"]
        now = int(time.time() * 1000)
        MlflowClient(tracking_uri=m["tracking_uri"]).log_batch(
            m["run_id"], metrics=[Metric(k, float(v), now, m["step"]) for k, v in metrics.items()])
        done.append("mlflow")
    if "trackio" in rec and metrics:
        log_trackio(rec["trackio"], metrics)
        done.append("trackio")
    if "tensorboard" in rec and metrics:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=rec["tensorboard"]["log_dir"])
        for key, value in metrics.items():
            writer.add_scalar(key, value, rec["tensorboard"]["step"])
        writer.close()
        done.append("tensorboard")
    if done:
        logger.info("eval results logged to the training's %s run", " and ".join(done))
    return done


_TRACKIO_LOG = """
import json, sys
import trackio
t, metrics = json.loads(sys.argv[1]), json.loads(sys.argv[2])
trackio.init(project=t["project"], name=t["run"], resume="must", auto_log_cpu=False, auto_log_gpu=False)
trackio.log({**metrics, "train/global_step": t["step"]})
trackio.finish()
"""


def log_trackio(t: dict, metrics: dict) -> None:
    """Reopen the training's trackio run (by name) and log the eval metrics at the training's last step.

    trackio fixes its storage dir when it is first imported: in this process when its trackio already points at the
    recorded dir (`run` right after training), else in a child process with TRACKIO_DIR set."""
    here = sys.modules.get("trackio.utils")
    if here is None or str(here.TRACKIO_DIR) != t["dir"]:
        subprocess.run([sys.executable, "-c", _TRACKIO_LOG, json.dumps(t), json.dumps(metrics)], check=True,
                       env={**os.environ, "TRACKIO_DIR": t["dir"]}, stdout=subprocess.DEVNULL)
        return
    import trackio

    trackio.init(project=t["project"], name=t["run"], resume="must", auto_log_cpu=False, auto_log_gpu=False)
    trackio.log({**metrics, "train/global_step": t["step"]})
    trackio.finish()
