"""`python -m pipeline <command>`: one CLI for every stage.

Each stage lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`. Heavy libraries (torch,
transformers, vllm) are imported inside `main`, so `--help` and `validate` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.errors import UserError  # noqa: F401 - re-exported: the base every command's errors derive from

# command -> (module, one-line help)
COMMANDS = {
    "train": ("pipeline.train", "fine-tune a model from a recipe (TRL SFTTrainer + EDoRA)"),
    "validate": ("pipeline.validate", "check a recipe without a GPU or a download and print it resolved"),
    "merge": ("pipeline.merge", "merge an adapter into its base and write a plain Hugging Face checkpoint"),
    "serve": ("pipeline.serve", "serve a merged checkpoint with vLLM's OpenAI-compatible server"),
    "eval": ("pipeline.evaluate", "evaluate a model (or saved completions) on GSM8K / MATH / the math suite"),
    "run": ("pipeline.run", "train, merge and evaluate one recipe end to end"),
    "compare": ("pipeline.compare", "put several models' eval results side by side, with paired significance"),
    "setup": ("pipeline.install", "install everything (torch, the exact pins, the demo's model and data) in one go"),
}


# Commands that read a recipe and take `--section.key=value` overrides after their own flags.
TAKES_OVERRIDES = ("train", "validate", "run")
_SUBPARSERS: dict = {}


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a typo such as --over must not silently mean --overwrite
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        importlib.import_module(module_name).add_arguments(p)
        _SUBPARSERS[name] = p
    return parser


def unknown_flags(command: str, extra: list[str]) -> list[str]:
    """Arguments argparse did not know that are not recipe overrides either, each with a suggestion."""
    import difflib

    top: set[str] = set()
    if command in TAKES_OVERRIDES:
        from pipeline.recipe import _schema_keys

        top = {k for k in _schema_keys() if "." not in k}
    flags = [o for a in _SUBPARSERS[command]._actions for o in a.option_strings]
    bad = []
    for i, arg in enumerate(extra):
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if command in TAKES_OVERRIDES and (key is None or "." in key or key in top):
            continue  # an override (or its value); the recipe loader checks it
        if key is None and i > 0 and extra[i - 1].startswith("-") and "=" not in extra[i - 1]:
            continue  # the value of an unknown flag already reported
        close = difflib.get_close_matches(arg.split("=", 1)[0].replace("_", "-"), flags, n=1, cutoff=0.6)
        bad.append(arg + (f" (did you mean {close[0]}?)" if close else ""))
    return bad
# Library messages that concern nothing a run of this project does: (logger, text in the message).
NOISE = [
    ("bitsandbytes.backends.cpu.ops", "pip install kernels"),  # an optional CPU 4-bit kernel; the built-in one is used
    ("DeepSpeed", "Setting accelerator to CPU"),  # DeepSpeed imported on a machine without a GPU: expected
]
NOISY_WARNINGS = [
    (r".*is_gradient_checkpointing.*is deprecated", FutureWarning),  # transformers' own rename, called by TRL/PEFT
    # PEFT checks for a resized vocabulary in the base's config.json, which a .gguf base does not have; EDoRA never
    # trains the embeddings, so there is nothing to check
    (r"Could not find a config file in .* will assume that the vocabulary was not modified", UserWarning),
]


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Drop the library messages in NOISE (verbose mode keeps them); everything else still shows."""
    import warnings

    for name, text in NOISE:
        logger = logging.getLogger(name)  # a filter on the logger itself: it holds for any handler
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    for pattern, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def setup_logging(verbose: bool = False) -> None:
    import os

    # Under torchrun/accelerate only rank 0 logs at INFO; other ranks log warnings and errors.
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = unknown_flags(args.command, extra)
    if bad:
        print(f"error: python -m pipeline {args.command}: unrecognized arguments: {', '.join(bad)}; see "
              f"python -m pipeline {args.command} --help", file=sys.stderr)
        return 2
    args.overrides = extra  # `--key=value` recipe overrides; each command validates its own
    setup_logging(args.verbose)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
