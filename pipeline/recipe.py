"""A training recipe: one YAML file, typed dataclasses, every problem reported at once.

`load_recipe(path, overrides)` reads the YAML, applies `--section.key=value` overrides (YAML scalar rules), checks
types, values and cross-field rules, and returns a `Recipe` or raises one `RecipeError` listing every problem.
Relative paths in a recipe resolve against the current working directory (run commands from the repository root);
the loader rewrites them to absolute paths, so a saved resolved recipe works from anywhere. `pkg://module/file`
names a file shipped inside an installed Python package (found without importing it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import UserError
from pipeline.recipe_rules import check_rules
from pipeline.recipe_schema import (  # noqa: F401 - re-exported: the schema's public names
    ALL_LINEAR,
    DTYPE,
    EDORA_ONLY,
    OPTIMIZERS,
    SCHEDULERS,
    SVD_ADAPTERS,
    AdapterConfig,
    DataConfig,
    EvalConfig,
    LauncherConfig,
    ModelConfig,
    Recipe,
    TrainingConfig,
)
from pipeline.recipe_translate import build_peft_config, sft_config_kwargs  # noqa: F401 - re-exported
from pipeline.specs import PKG_HINTS, resolve_path  # noqa: F401 - re-exported
from pipeline.typed_yaml import Checker, merge_dicts, parse_overrides, schema_keys

# Names people bring from other trainers.
ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "alpha": "lora_alpha", "rank": "r", "lora_r": "r",
           "lora_dropout": "dropout", "model_name_or_path": "name_or_path", "max_seq_length": "max_length",
           "torch_dtype": "dtype", "dataset": "source", "scheduler": "lr_scheduler_type"}


class RecipeError(UserError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"{source}: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(f"  - {e}" for e in errors))


def _schema_keys() -> list[str]:
    """Every dotted recipe key (the command line tells overrides from unknown flags with it)."""
    return schema_keys(Recipe)


def recipe_from_dict(data, source: str = "<recipe>", overrides=()) -> Recipe:
    """Build and check a recipe from a parsed mapping (what load_recipe does after reading the YAML)."""
    checker = Checker(Recipe, ALIASES)
    over = parse_overrides(overrides, checker)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe is a mapping of keys (name:, model:, ...), got {type(data).__name__}"])
    recipe = checker.build(Recipe, merge_dicts(data, over) if isinstance(data, dict) else data)
    check_rules(recipe, checker)
    if checker.errors:
        raise RecipeError(source, checker.errors)
    return recipe


def load_recipe(path, overrides=()) -> Recipe:
    """Read, override and check a recipe YAML file; raises RecipeError listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {path} not found (paths are relative to {Path.cwd()})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"recipe {path} is a directory; pass the YAML file") from None
    return recipe_from_dict(data, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what runs/<name>/recipe.yaml holds; load_recipe reads it back)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=120)


def save_recipe(recipe: Recipe, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dump_recipe(recipe))
