"""`samples.jsonl`: one graded sample per line, appended and flushed as it arrives, so a rerun resumes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def load_done(path: Path) -> dict[tuple[str, str], dict]:
    """Rows already written, keyed by (task, id). A torn last line (the run was killed mid-write) is cut off the
    file so later appends start on a clean line; a bad line elsewhere is an error, since that is not our writing."""
    if not path.exists():
        return {}
    with path.open("rb") as f:
        lines = f.readlines()
    done: dict[tuple[str, str], dict] = {}
    good_bytes = 0
    for lineno, raw in enumerate(lines, 1):
        try:
            row = json.loads(raw)
            key = (row["task"], str(row["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a samples.jsonl row; move the file away or use another "
                                 "--out") from None
            logger.warning("%s:%d: incomplete last line (interrupted run); dropping it, it will be redone",
                           path, lineno)
            with path.open("r+b") as f:
                f.truncate(good_bytes)
            return done
        good_bytes += len(raw)
        done[key] = row
    if lines and not lines[-1].endswith(b"\n"):
        with path.open("ab") as f:  # a whole last row missing only its newline: end the line before appending
            f.write(b"\n")
    return done


class SampleWriter:
    """Append rows to samples.jsonl; every row is flushed and fsynced so a crash keeps it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def graded_row(task, sample, completion: str, tokens: int | None, backend: str) -> dict:
    """One samples.jsonl row: the sample, the completion and its scores."""
    return {"task": task.name, "id": sample.id, "question": sample.question, "gold": sample.gold,
            "subject": sample.subject, "level": sample.level, "completion": completion, "generated_tokens": tokens,
            "backend": backend, "scores": task.score(sample, completion)}


def check_run_config(path: Path, run: dict, has_results: bool) -> None:
    """Refuse to mix samples made with another model, data or sampling into one samples.jsonl."""
    if not path.exists() or not has_results:
        path.write_text(json.dumps(run, indent=2) + "\n")
        return
    old = json.loads(path.read_text())
    problems = []
    if old["model"] != run["model"]:
        problems.append(f"model was {old['model']!r}, now {run['model']!r}")
    for key, what in (("served_model", "the server serves"), ("model_fingerprint", "weights fingerprint")):
        if old.get(key) and run.get(key) and old[key] != run[key]:
            problems.append(f"{what} was {old[key]!r}, now {run[key]!r} (other weights under the same name)")
    for name, cfg in run["tasks"].items():
        prev = old["tasks"].get(name)
        if prev is None:
            continue
        for key in ("data_sha256", "sampling", "prompt"):
            if prev[key] != cfg[key]:
                problems.append(f"{name} {key} was {prev[key]!r}, now {cfg[key]!r}")
    if problems:
        raise UserError(f"{path.parent} holds results made with other settings ({'; '.join(problems)}). "
                        "Use another --out, or delete that dir to start over")
    old["tasks"].update(run["tasks"])
    old.update({k: run[k] for k in ("served_model", "model_fingerprint") if run.get(k)})
    path.write_text(json.dumps(old, indent=2) + "\n")
