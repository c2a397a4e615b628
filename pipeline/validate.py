"""`python -m pipeline validate RECIPE.yaml [--section.key=value ...]`: check a recipe without a GPU or a download.

Prints the resolved recipe (YAML, every default filled in, paths absolute) on stdout, followed by a summary as YAML
comments. Local data files are read and mapped too, so malformed rows show up before a GPU is booked.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import LOCAL_SUFFIXES

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/mistral-7b/edora-metamathqa.yaml")
    parser.add_argument("--no-data", action="store_true", help="do not read local data files")
    parser.epilog = "Any --section.key=value after the recipe overrides that key, e.g. --training.learning_rate=1e-4"


def main(args) -> int:
    from pipeline.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(dump_recipe(recipe), end="")
    t, a = recipe.training, recipe.adapter
    lines = [f"ok: {args.recipe}",
             f"run dir: {recipe.run_dir}",
             f"adapter: {a.method} r={a.r} alpha={a.lora_alpha} on {', '.join(a.target_modules)}",
             f"effective batch: {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
             f"accumulation x {recipe.launcher.num_processes} processes = {recipe.effective_batch_size}"]
    d = recipe.data
    sources = [s for one in (d.source, d.eval_source) for s in (one if isinstance(one, list) else [one]) if s]
    if args.no_data:
        lines.append("data: not read (--no-data)")
    elif not all(Path(s).suffix in LOCAL_SUFFIXES for s in sources):
        lines.append("data: not read (a hub dataset; train downloads it)")
    else:
        from pipeline.data import load_sft_dataset

        _, _, stats = load_sft_dataset(d, recipe.seed)
        for part, s in stats.items():
            if s:
                lines.append(f"{part} data: {s['kept']} of {s['rows']} rows kept from {s['source']} {s['split']}"
                             + (f"; {s['malformed']} malformed, e.g. {s['malformed_examples'][0]}"
                                if s["malformed"] else "")
                             + (f"; {s['held_out_for_eval']} held out for eval" if "held_out_for_eval" in s else ""))
    print("\n".join("# " + line for line in lines))
    return 0
