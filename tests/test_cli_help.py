"""`--help` of every command is instant because no heavy library is imported to print it (measured by what the
interpreter has loaded, not by a clock)."""

import subprocess
import sys

import pytest
from tests_paths import ROOT

from pipeline.cli import COMMANDS

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "deepspeed", "vllm")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_imports_no_heavy_library(command):
    code = (f"import sys\nfrom pipeline.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
            f"except SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m pipeline" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"
