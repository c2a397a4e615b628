"""`python -m pipeline run RECIPE.yaml [--key=value ...]`: train, merge and evaluate one recipe, one report.

Each stage writes its own outputs under runs/<name>/ (adapter/, merged/, eval/); this writes runs/<name>/report.md
linking them. Rerunning after an interruption resumes: training from its last checkpoint (--resume), the merge is
skipped when merged/ is complete, and the eval resumes from its samples.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.cli import UserError
from pipeline.cli import main as cli_main

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("--resume", action="store_true", help="continue training from the last checkpoint")
    parser.add_argument("--tasks", default="gsm8k,math",
                        help="eval tasks (default: gsm8k,math; suite = every shipped math set)")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="eval backend (default: vllm)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each task")
    parser.add_argument("--data-file", action="append", default=[], metavar="TASK=PATH",
                        help="local eval data for a task (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap new tokens per answer (smoke runs)")
    parser.add_argument("--merge-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--new-run", action="store_true",
                        help="when runs/<name>/ was trained with a recipe that differs in what it trains, train a "
                             "new run <name>-<recipe hash> instead of refusing")


def main(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runstate import check_recipe
    from pipeline.train import train

    recipe = check_recipe(load_recipe(args.recipe, args.overrides), new_run=args.new_run)  # never reuse silently
    run_dir = Path(recipe.run_dir)
    adapter = run_dir / "adapter"
    full = recipe.adapter.method == "full"  # the trained model is merged/ itself: nothing to merge
    trained = (run_dir / "merged" / "config.json") if full else (adapter / "adapter_config.json")
    if not trained.exists() or args.resume:
        train(recipe, resume=args.resume)
        free_accelerator_memory()  # the eval backend (vLLM) sizes itself from the free GPU memory
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under a multi-GPU launch only rank 0 merges and evaluates
    merged = run_dir / "merged"
    if not full and not (merged / "merge_report.json").exists():
        code = cli_main(["merge", "--adapter", str(adapter), "--out", str(merged), "--dtype", args.merge_dtype])
        if code != 0:
            raise UserError(f"merge failed (exit {code}); the adapter is kept in {adapter}")
    eval_dir = run_dir / "eval"
    if not args.skip_eval:
        cmd = ["eval", "--model", str(merged), "--tasks", args.tasks, "--backend", args.backend,
               "--out", str(eval_dir)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.max_tokens:
            cmd += ["--max-tokens", str(args.max_tokens)]
        for spec in args.data_file:
            cmd += ["--data-file", spec]
        code = cli_main(cmd)
        if code != 0:
            raise UserError(f"eval failed (exit {code}); adapter and merged checkpoint are kept in {run_dir}")
    report = write_report(run_dir, recipe.name)
    print(report)
    return 0


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_report(run_dir: Path, name: str) -> Path:
    from pipeline.train import read_metrics

    lines = [f"# {name}", ""]
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
    summary = run_dir / "eval" / "summary.json"
    if summary.exists():
        lines += ["## Evaluation", "", "- details: eval/report.md", "", "```",
                  json.dumps(json.loads(summary.read_text()).get("tasks", {}), indent=1)[:4000], "```", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
