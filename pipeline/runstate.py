"""The state of a run dir: one writer at a time, and a stored recipe that no later command silently contradicts.

`run_lock(run_dir)` holds runs/<name>/.lock (pid, host, start time, command) while a command writes there; a second
writer is refused with the owner named, and a lock left by a process that no longer runs (same host) is named and
taken over. `check_recipe(recipe, new_run)` compares a resolved recipe with runs/<name>/recipe.yaml of a run that
already trained: bookkeeping keys may change, anything that changes what is trained is refused with the diff (or,
with new_run, the recipe is renamed <name>-<8 hex digits of its training settings>).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import time
import typing
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.yaml"
# Keys that change how a run is logged, saved or launched, not what it trains: a resume may change them.
BOOKKEEPING = {"output_dir", "training.logging_steps", "training.save_steps", "training.save_total_limit",
               "training.eval_steps", "training.report_to", "training.dataloader_num_workers",
               "training.per_device_eval_batch_size", "data.num_proc",
               # how fast, not what: the same rows and loss (padding-free: tested), numerics aside
               "training.padding_free", "training.checkpoint_every_n_layers", "training.liger_kernel",
               "training.torch_compile"}
BOOKKEEPING_SECTIONS = ("eval.",)  # what `run` evaluates after training changes nothing that was trained


def is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING or key.startswith(BOOKKEEPING_SECTIONS)


_MISSING = "<not set>"


# ---- one writer per run dir ------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("time", 0)))
    return f"pid {owner.get('pid')} on host {owner.get('host')!r} (since {started}: {owner.get('command', '?')})"


def _try_create(path: Path, content: str) -> bool:
    """Create `path` with `content` atomically, only if it does not exist (a lock is never seen half-written)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold runs/<name>/.lock while the body runs (rank 0 only; nested use in one process is a no-op)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
          "command": " ".join(redact_argv(sys.argv))}
    while not _try_create(path, json.dumps(me) + "\n"):
        owner = _read_lock(path)
        if owner is None:
            raise UserError(f"{path} exists but cannot be read: another command may hold this run dir. If none "
                            "does, delete the file and run again")
        if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            yield  # this process already holds it (e.g. `run` calling `train`)
            return
        if owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
            logger.warning("stale lock %s: %s is no longer running; taking it over", path, _describe(owner))
            path.unlink(missing_ok=True)
            continue
        where = "" if owner.get("host") == me["host"] else (" (another host: this one cannot tell whether it still "
                                                            "runs)")
        raise UserError(f"{run_dir} is in use by {_describe(owner)}{where}. Wait for it to finish, or use another "
                        f"--name; if you are sure that process is gone, delete {path}")
    try:
        yield
    finally:
        owner = _read_lock(path)
        if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            path.unlink(missing_ok=True)


def redact_argv(argv: list[str]) -> list[str]:
    """argv with secret values (--api-key) replaced, for anything written to a file or a log."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a in ("--api-key", "--api_key"):
            out.append(a)
            hide = True
        elif a.startswith(("--api-key=", "--api_key=")):
            out.append(a.split("=", 1)[0] + "=***")
        else:
            out.append(a)
    return out


# ---- the stored recipe -----------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _defaults(cls=None, prefix: str = "") -> dict:
    """Schema defaults, flattened: a key a stored recipe predates counts as unchanged when it has its default."""
    from pipeline.recipe import Recipe

    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_defaults(hints[f.name], f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = f.default_factory()
    return out


def has_trained(run_dir: Path) -> bool:
    """True once a run dir holds an adapter (or a full fine-tune's model) or a checkpoint: from then on its
    recipe.yaml is binding."""
    return (run_dir / "adapter" / "adapter_config.json").is_file() or (run_dir / "merged" / "config.json").is_file() \
        and (run_dir / "trainer_state.json").is_file() or any(
        p.is_dir() and p.name.split("-")[-1].isdigit() for p in run_dir.glob("checkpoint-*"))


def recipe_changes(stored: dict, recipe) -> dict[str, tuple]:
    """key -> (stored value, new value) for every key that differs."""
    old, new, defaults = _flatten(stored), _flatten(recipe.to_dict()), _defaults()
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == _MISSING and key in defaults and b == defaults[key]:
            continue
        if a != b:
            changes[key] = (a, b)
    return changes


def check_recipe(recipe, new_run: bool = False):
    """The recipe to train with, after comparing it with the one stored in its run dir (see the module docstring).

    Raises UserError listing every training-dynamics change; nothing is written here."""
    run_dir = Path(recipe.run_dir)
    stored_path = run_dir / RECIPE_FILE
    if not stored_path.is_file() or not has_trained(run_dir):
        return recipe
    try:
        stored = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{stored_path} cannot be read ({type(e).__name__}); it records how {run_dir} was trained. "
                        "Restore it, or use another --name") from None
    changes = recipe_changes(stored if isinstance(stored, dict) else {}, recipe)
    binding = {k: v for k, v in changes.items() if not is_bookkeeping(k)}
    if not binding:
        for key, (a, b) in changes.items():
            logger.info("recipe: %s changes from %r to %r (bookkeeping only)", key, a, b)
        return recipe
    if new_run:
        # named by the recipe, not by what is on disk: every rank of a distributed launch picks the same dir, and
        # the same command run again continues that run (--resume) instead of starting a third
        trained = {k: v for k, v in _flatten(recipe.to_dict()).items() if not is_bookkeeping(k) and k != "name"}
        digest = hashlib.sha256(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{recipe.name}-{digest}"
        logger.info("the recipe differs from %s in %s: starting a new run, %s", stored_path,
                    ", ".join(binding), name)
        return dataclasses.replace(recipe, name=name)
    diff = "\n".join(f"  {k}: {a!r} (stored) -> {b!r} (now)" for k, (a, b) in binding.items())
    raise UserError(f"{run_dir} was trained with another recipe ({stored_path}); these changes would change what is "
                    f"trained:\n{diff}\nDrop the changes to continue that run, pass --new-run to train a new one "
                    f"({recipe.name}-<hash of the recipe>), or set another --name. Nothing was written.")
