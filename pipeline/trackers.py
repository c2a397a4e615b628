"""Experiment trackers: `training.report_to` names what transformers' Trainer reports to; when `pipeline eval` (or
`run`) evaluates runs/<name>/merged, the eval accuracies go to the same tracker run (W&B and TensorBoard).

Training metrics reach every tracker through transformers' own callbacks. This module only (1) checks the names and
that their packages are installed, (2) keeps the trackers' files inside the run dir (W&B under runs/<name>/wandb,
MLflow under runs/<name>/mlruns unless the environment says otherwise), (3) records which tracker run the training
wrote to (runs/<name>/trackers.json) and (4) logs eval results there.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
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
            out.append(f"tracker {v!r} needs the {MODULES[v]!r} package: pip install {v.replace('_', '-')} "
                       "(requirements.txt pins wandb)")
    if "none" in values and len(values) > 1:
        out.append(f"{values}: 'none' cannot be combined with trackers; drop it or use report_to: none alone")
    return out


_SET_HERE: set[str] = set()  # variables this module set (a later run in the same process moves them)


def prepare(run_dir: Path) -> None:
    """Keep tracker files inside the run dir unless the user already pointed them elsewhere."""
    for key, value in (("WANDB_DIR", str(run_dir)), ("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())):
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
