"""Saved completions (`pipeline eval --predictions FILE.jsonl`) matched to the samples they answer."""

from __future__ import annotations

import logging
from pathlib import Path

from eval.tasks import DataError, read_jsonl

logger = logging.getLogger(__name__)


def read_predictions(path: Path, tasks: list, samples: dict[str, list]) -> dict[str, list[tuple[object, str]]]:
    """Map each prediction row to (sample, completion) per task; rows naming unknown samples are errors."""
    by_id = {t.name: {s.id: s for s in samples[t.name]} for t in tasks}
    by_question = {t.name: {s.question.strip(): s for s in samples[t.name]} for t in tasks}
    out: dict[str, list] = {t.name: [] for t in tasks}
    seen = set()
    skipped = 0
    rows = read_jsonl(path)
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if not isinstance(row.get("completion"), str):
            raise DataError(f"{where}: no 'completion' string; each row needs 'completion' and 'id' or 'question'")
        if "task" in row:
            if row["task"] not in out:
                skipped += 1  # e.g. a samples.jsonl with both tasks graded for one
                continue
            candidates = [row["task"]]
        else:
            candidates = list(out)
        hits = []
        for name in candidates:
            if "id" in row:
                hit = by_id[name].get(str(row["id"]))
            elif isinstance(row.get("question"), str):
                hit = by_question[name].get(row["question"].strip())
            else:
                raise DataError(f"{where}: no 'id' or 'question'; say which sample the completion answers")
            if hit is not None:
                hits.append((name, hit))
        if not hits:
            key = f"id {row['id']!r}" if "id" in row else f"question {row['question'][:60]!r}"
            raise DataError(f"{where}: {key} matches no sample of {', '.join(candidates)}; check --tasks and "
                            "--data-file (the predictions must be for the same data)")
        if len(hits) > 1:
            raise DataError(f"{where}: matches samples of several tasks ({', '.join(h[0] for h in hits)}); add a "
                            "'task' field to each row")
        name, sample = hits[0]
        if (name, sample.id) in seen:
            raise DataError(f"{where}: a second completion for {name} sample {sample.id!r}; keep one per sample")
        seen.add((name, sample.id))
        out[name].append((sample, row["completion"]))
    if skipped:
        logger.info("skipped %d prediction rows of tasks not in --tasks", skipped)
    return out
