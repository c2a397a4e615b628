"""`samples.jsonl`: one graded sample per line, appended and flushed as it arrives, so a rerun resumes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
