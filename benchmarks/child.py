"""Run one variant of a benchmark in a fresh Python process (its own CUDA context and memory) and read back the
`RESULT <json>` line it prints with `emit`."""

from __future__ import annotations

import json
import subprocess
import sys

PREFIX = "RESULT "


def emit(result: dict) -> None:
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, argv: list[str], name: str) -> dict | None:
    """`python script *argv --one name`; its result, or None after printing why it failed."""
    proc = subprocess.run([sys.executable, script, *argv, "--one", name], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(PREFIX):])
