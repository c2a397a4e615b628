"""Accuracy of fine-tuning methods on one real model, through the real CLI: base, EDoRA, LoRA-XS, PEFT LoRA, PEFT DoRA
and a full fine-tune (the upper reference).

Every method gets the same data, steps, batch, seed and rank, and the same learning-rate sweep size (3 values each by
default). The learning rate of each method is chosen by the lowest held-out loss on rows held out of the TRAINING
data (`data.eval_size`), never on a test set; only the chosen run of each method is merged and evaluated.

    python benchmarks/method_compare.py --model MODEL --label smollm2-135m \
        --train-data gsm8k/train.jsonl,math/train.jsonl --eval-data gsm8k=gsm8k/test.jsonl,math500=math_oai/test.jsonl \
        --phase train|eval|report|all [--parallel 6] [--budget-s 540]

Phases: `train` runs every (method, lr) job not yet in the results file; `eval` merges and evaluates the selected
run of each method (and the base model) on each eval set; `report` writes JSON + Markdown + PNG. Resumable: finished
rows are kept in --results and skipped, an interrupted training job continues from its last checkpoint
(`train --resume`) and an interrupted eval from its samples.jsonl, so a sweep can be spread over short GPU calls.
Jobs run as concurrent CLI processes (`--parallel`): a small model leaves one GPU mostly idle.

On a GPU host whose disk is lost after the session, `--export DIR` packs every finished eval dir into one archive
(DIR/method_compare_<label>_evals.tar.xz) beside a copy of the results JSON; later, locally,
`--phase report --evals-archive FILE` unpacks it and writes `pipeline compare`'s paired statistics over the rows
(method_compare_<label>_compare.{md,png,json}). Without an archive the report compares the eval dirs under --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]
import method_compare_evals as evals  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("edora", "loraxs", "lora", "dora", "full")
# 4x-spaced grids around each method's published learning rate (EDoRA/LoRA-XS 4e-3, LoRA/DoRA 2e-4 at 7B; small
# models usually want more): the same size for every method.
DEFAULT_LRS = {"edora": [1e-3, 4e-3, 1.6e-2], "loraxs": [1e-3, 4e-3, 1.6e-2], "lora": [2.5e-4, 1e-3, 4e-3],
               "dora": [2.5e-4, 1e-3, 4e-3], "full": [1e-5, 4e-5, 1.6e-4]}
# eval set name -> the pipeline's task that grades it
EVAL_TASK = {"gsm8k": "gsm8k", "math500": "math", "math": "math"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="base model: a .gguf file, a model dir or pkg://...")
    p.add_argument("--label", required=True, help="results name: benchmarks/results/method_compare_<label>.*")
    p.add_argument("--train-data", required=True, help="comma-separated training files (read and concatenated)")
    p.add_argument("--eval-data", default="", help="comma-separated NAME=PATH, NAME in gsm8k, math500, math")
    p.add_argument("--methods", default="base," + ",".join(METHODS))
    p.add_argument("--lrs", default="", help="per-method grids, e.g. 'edora=1e-3:4e-3:1.6e-2;lora=1e-3' "
                                             "(default: DEFAULT_LRS, 3 values each)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:METHOD:KEY=VAL,...",
                   help="an extra method row with recipe overrides, e.g. 'edora-r128:edora:adapter.r=128'; it gets "
                        "the grid of METHOD")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="rows per optimizer step")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (batch / accum rows each): memory")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--heldout", type=int, default=500, help="training rows held out for the held-out loss")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", choices=["auto", "true", "false"], default="auto", help="autocast (auto: on a GPU)")
    p.add_argument("--phase", choices=["train", "eval", "report", "all"], default="all")
    p.add_argument("--work", default="runs/method_compare", help="where runs are written")
    p.add_argument("--results", help="results JSON (read to resume, rewritten after each job); default "
                                     "benchmarks/results/method_compare_<label>.json")
    p.add_argument("--parallel", type=int, default=1, help="concurrent CLI processes")
    p.add_argument("--budget-s", type=float, default=0, help="stop and checkpoint all jobs after this many seconds")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-max-tokens", type=int, default=None, help="cap new tokens (default: the tasks' own)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--merge-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (kept in the JSON)")
    p.add_argument("--export", metavar="DIR", help="also write DIR/method_compare_<label>_evals.tar.xz (every finished "
                                                   "eval dir) and a copy of the results JSON: what a GPU call brings "
                                                   "back in $OUT")
    p.add_argument("--evals-archive", metavar="FILE", help="an --export archive: unpacked under --work, then the "
                                                           "report compares its rows (pipeline compare)")
    return p.parse_args(argv)


# --- bookkeeping ------------------------------------------------------------------------------------------------


def grids(args) -> dict[str, tuple[str, list[float], dict]]:
    """method row name -> (adapter method, learning rates, extra recipe overrides)."""
    lrs = {m: list(v) for m, v in DEFAULT_LRS.items()}
    for part in filter(None, args.lrs.split(";")):
        name, _, values = part.partition("=")
        lrs[name.strip()] = [float(v) for v in values.split(":")]
    out = {m: (m, lrs[m], {}) for m in args.methods.split(",") if m in METHODS}
    for spec in args.variant:
        name, method, kvs = (spec.split(":", 2) + [""])[:3]
        if method not in METHODS:
            raise SystemExit(f"--variant {spec!r}: method must be one of {', '.join(METHODS)}")
        extra = dict(kv.split("=", 1) for kv in filter(None, kvs.split(",")))
        out[name] = (method, lrs.get(name, lrs[method]), {k: yaml.safe_load(v) for k, v in extra.items()})
    return out


def job_name(row: str, lr: float) -> str:
    return f"{row}-lr{lr:g}"


def load_results(path: Path, args) -> dict:
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("setup") != setup(args):
            raise SystemExit(f"{path} was made with other settings:\n  {res.get('setup')}\nnow\n  {setup(args)}\n"
                             "use another --label/--results, or delete it to start over")
        return res
    return {"setup": setup(args), "train": {}, "eval": {}, "meta": {}}


def setup(args) -> dict:
    """What every row must share (a resumed sweep with other settings is refused)."""
    return {"model": Path(args.model).name, "train_data": [Path(p).name for p in args.train_data.split(",")],
            "rank": args.rank, "batch": args.batch, "accum": args.accum, "epochs": args.epochs, "max_steps": args.max_steps,
            "heldout": args.heldout, "max_length": args.max_length, "seed": args.seed}


def save_results(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)


def recipe_for(args, name: str, method: str, lr: float, extra: dict, work: Path) -> Path:
    steps_total = args.max_steps
    recipe = {
        "name": name, "seed": args.seed, "output_dir": str(work),
        "model": {"name_or_path": args.model, "dtype": "float32", "attn_implementation": "sdpa"},
        "adapter": {"method": method, "r": args.rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"]},
        "data": {"source": args.train_data.split(","), "split": "train", "format": "auto",
                 "max_length": args.max_length, "eval_size": args.heldout},
        "training": {"num_train_epochs": args.epochs, "max_steps": steps_total,
                     "per_device_train_batch_size": args.batch // args.accum,
                     "per_device_eval_batch_size": args.batch // args.accum,
                     "gradient_accumulation_steps": args.accum, "learning_rate": lr, "lr_scheduler_type": "cosine",
                     "warmup_ratio": 0.03, "weight_decay": 0.0, "bf16": bf16(args), "gradient_checkpointing": False,
                     "logging_steps": 5, "save_steps": 50, "eval_steps": 100, "save_total_limit": 1},
    }
    for key, value in extra.items():
        node = recipe
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def bf16(args) -> bool:
    if args.bf16 != "auto":
        return args.bf16 == "true"
    import torch

    return torch.cuda.is_available()


def read_train_row(run: Path, log: str) -> dict:
    """Loss curve, held-out loss, throughput and trainable parameters of a finished run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    trainable = None
    for line in log.splitlines():
        if "trainable parameters:" in line:
            trainable = int(line.split("trainable parameters:")[1].split(" of ")[0].replace(",", "").strip())
    end = [r for r in rows if "train_runtime" in r]
    speeds = sorted(r["tokens_per_second"] for r in train if r.get("tokens_per_second"))
    return {"trainable": trainable, "steps": max((r["step"] for r in rows), default=0),
            "loss_curve": [[r["step"], r["loss"]] for r in train],
            "heldout_curve": [[r["step"], r["eval_loss"]] for r in evals],
            "heldout_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,  # median of the log steps
            "peak_gpu_gib": max((r.get("peak_gpu_gib", 0) for r in train), default=None),
            "train_runtime_s": end[-1]["train_runtime"] if end else None}


# --- jobs -------------------------------------------------------------------------------------------------------


class Job:
    def __init__(self, key: str, cmds: list[list[str]], log: Path, on_done):
        self.key, self.cmds, self.log, self.on_done = key, cmds, log, on_done
        self.proc, self.started, self.text = None, None, ""

    def start(self):
        self.started = self.started or time.time()
        cmd = self.cmds.pop(0)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "a")
        self._fh.write(f"\n$ {' '.join(cmd)}\n")
        self._fh.flush()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)


def run_jobs(jobs: list[Job], parallel: int, deadline: float | None) -> None:
    """Run jobs (each a chain of commands) `parallel` at a time; at the deadline interrupt the running ones
    (SIGINT: the trainer stops, checkpoints are kept) and start no more."""
    queue, running = list(jobs), []
    while queue or running:
        while queue and len(running) < parallel and (deadline is None or time.time() < deadline):
            job = queue.pop(0)
            job.start()
            running.append(job)
            print(f"[{time.strftime('%H:%M:%S')}] start {job.key}", flush=True)
        if not running:
            break
        time.sleep(2)
        for job in list(running):
            code = job.proc.poll()
            if code is None:
                if deadline is not None and time.time() > deadline:
                    os.killpg(job.proc.pid, signal.SIGINT)
                    try:
                        job.proc.wait(60)
                    except subprocess.TimeoutExpired:
                        os.killpg(job.proc.pid, signal.SIGKILL)
                    job._fh.close()
                    running.remove(job)
                    print(f"[{time.strftime('%H:%M:%S')}] stopped {job.key} at the budget (resumes next time)")
                continue
            job._fh.close()
            if code == 0 and job.cmds:
                job.start()
                continue
            running.remove(job)
            elapsed = time.time() - job.started
            text = job.log.read_text(errors="replace")
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if code == 0 else f'FAILED ({code})'} {job.key} "
                  f"{elapsed:.0f}s", flush=True)
            if code != 0:
                print("\n".join(text.splitlines()[-15:]))
            job.on_done(code, elapsed, text)
        if deadline is not None and time.time() > deadline and not running:
            break


def train_jobs(args, res, work: Path, save) -> list[Job]:
    jobs = []
    for row, (method, lrs, extra) in grids(args).items():
        for lr in lrs:
            name = job_name(row, lr)
            if name in res["train"] and res["train"][name].get("status") == "ok":
                continue
            run = work / name
            recipe = recipe_for(args, name, method, lr, extra, work)
            trained = run / ("merged/config.json" if method == "full" else "adapter/adapter_config.json")
            resume = not trained.exists() and any(run.glob("checkpoint-*"))
            cmd = [sys.executable, "-m", "pipeline", "train", str(recipe)] + (["--resume"] if resume else [])
            if trained.exists():
                cmd = [sys.executable, "-c", "pass"]  # trained in an earlier call: only read its records

            def done(code, elapsed, text, name=name, row=row, method=method, lr=lr, run=run, extra=extra):
                entry = {"row": row, "method": method, "lr": lr, "overrides": extra, "status": "ok" if code == 0
                         else f"failed ({code})", "wall_s": round(elapsed, 1)}
                if code == 0:
                    log = (work / "logs" / f"train-{name}.log").read_text(errors="replace")
                    entry.update(read_train_row(run, log))
                res["train"][name] = entry
                save()

            jobs.append(Job(name, [cmd], work / "logs" / f"train-{name}.log", done))
    return jobs


def selected(res, args) -> dict[str, str]:
    """method row -> the job with the lowest held-out loss; a row is selectable only when its whole grid finished."""
    out = {}
    for row, (_, lrs, _) in grids(args).items():
        entries = [res["train"].get(job_name(row, lr)) for lr in lrs]
        if all(e and e.get("status") == "ok" and e.get("heldout_loss") is not None for e in entries):
            best = min(entries, key=lambda e: e["heldout_loss"])
            out[row] = job_name(row, best["lr"])
    return out


def eval_jobs(args, res, work: Path, save) -> list[Job]:
    sets = dict(spec.split("=", 1) for spec in filter(None, args.eval_data.split(",")))
    models = {"base": args.model} if "base" in args.methods.split(",") else {}
    models.update({row: str(work / name / "merged") for row, name in selected(res, args).items()})
    jobs = []
    for row, model in models.items():
        cmds, todo = [], []
        run = work / ("base" if row == "base" else selected(res, args)[row])
        full = row != "base" and grids(args)[row][0] == "full"  # trained straight into merged/
        if row != "base" and not full and not (Path(model) / "merge_report.json").exists():
            cmds.append([sys.executable, "-m", "pipeline", "merge", "--adapter", str(run / "adapter"), "--out", model,
                         "--dtype", args.merge_dtype, "--overwrite"])
        for set_name, path in sets.items():
            key = f"{row}/{set_name}"
            if key in res["eval"] and res["eval"][key].get("status") == "ok":
                continue
            out = run / f"eval-{set_name}"
            cmd = [sys.executable, "-m", "pipeline", "eval", "--model", model, "--tasks", EVAL_TASK[set_name],
                   "--backend", args.backend, "--batch-size", str(args.eval_batch_size), "--out", str(out),
                   "--data-file", f"{EVAL_TASK[set_name]}={path}"]
            cmd += ["--max-tokens", str(args.eval_max_tokens)] if args.eval_max_tokens else []
            cmd += ["--limit", str(args.eval_limit)] if args.eval_limit else []
            cmds.append(cmd)
            todo.append((key, out, set_name))
        if not todo:
            continue

        def done(code, elapsed, text, row=row, todo=todo, run=run):
            for key, out, set_name in todo:
                summary = out / "summary.json"
                entry = {"row": row, "set": set_name, "job": run.name, "status": "ok" if summary.exists() and
                         code == 0 else f"failed ({code})"}
                if summary.exists():
                    s = json.loads(summary.read_text())
                    t = s["tasks"][EVAL_TASK[set_name]]
                    entry.update({"n": t["n"], "accuracy": t["accuracy"], "correct": t["correct"],
                                  "no_answer": t["invalid"], "no_answer_flexible": t.get("invalid_flexible"),
                                  "sampling": s["sampling"], "backend": s["backend"],
                                  "generated_tokens_per_s": s["generated_tokens_per_s"]})
                res["eval"][key] = entry
            save()

        jobs.append(Job(f"eval {row}", cmds, work / "logs" / f"eval-{row}.log", done))
    return jobs


# --- report -----------------------------------------------------------------------------------------------------


def lr_edges(res: dict) -> dict[str, str]:
    """method row -> a note when its chosen learning rate is the lowest or highest of the grid it was chosen from:
    the held-out loss may keep falling beyond that edge, so the grid should be widened before trusting the pick."""
    notes = {}
    for row, name in res.get("selected", {}).items():
        lrs = sorted({e["lr"] for e in res["train"].values() if e.get("row") == row and e.get("status") == "ok"})
        lr = res["train"][name]["lr"]
        if len(lrs) < 2 or lr not in (lrs[0], lrs[-1]):
            continue
        top = lr == lrs[-1]
        step = lrs[-1] / lrs[-2] if top else lrs[1] / lrs[0]  # the grid's own spacing, one more step out
        wider = lrs + [lr * step] if top else [lr / step] + lrs
        notes[row] = (f"{row}: lr at the grid's {'top' if top else 'bottom'} edge ({lr:g} of "
                      f"{', '.join(f'{x:g}' for x in lrs)}): widen the grid, e.g. --lrs "
                      f"'{row}={':'.join(f'{x:g}' for x in wider)}'")
    return notes


def write_report(res: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, sel, edges = res.get("meta", {}), res.get("selected", {}), lr_edges(res)
    lines = [f"# Method comparison on real weights: {res['setup']['model']}", "",
             f"Command: `{meta.get('command', '')}`  ", f"Commit {meta.get('commit', '?')}, {meta.get('machine', '?')}, "
             f"model sha256 {meta.get('model_sha256', '?')[:16]}", "",
             "Setup: " + ", ".join(f"{k} {v}" for k, v in res["setup"].items()), "",
             f"Status: {sum(e.get('status') == 'ok' for e in res['train'].values())} of "
             f"{meta.get('train_jobs', '?')} training runs finished, {len(sel)} methods chosen, "
             f"{sum(e.get('status') == 'ok' for e in res['eval'].values())} evaluations finished.", "",
             *[f"- {note}" for note in meta.get("notes", [])], "",
             "Learning rates are chosen per method by the lowest held-out loss on training rows held out of the "
             "training data (never on a test set); only the chosen run is evaluated.", "",
             "## Sweep (held-out loss, lower is better; * = chosen; edge = chosen at the grid's edge)", "",
             "| row | method | lr | trainable | steps | held-out loss | last train loss | tokens/s | peak GiB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(res["train"].items()):
        if e.get("status") != "ok":
            lines.append(f"| {e['row']} | {e['method']} | {e['lr']:g} | | | {e['status']} | | | | |")
            continue
        star = ("*" + (" edge" if e["row"] in edges else "")) if sel.get(e["row"]) == name else ""
        lines.append(f"| {e['row']} | {e['method']} | {e['lr']:g}{star} | {e['trainable']:,} | {e['steps']} | "
                     f"{e['heldout_loss']:.4f} | {e['loss_curve'][-1][1]:.4f} | {e['tokens_per_s'] or 0:,.0f} | "
                     f"{e['peak_gpu_gib'] or 0} | {e['wall_s']:.0f} |")
    lines += [""] + [f"- {note}" for note in edges.values()]
    sets = sorted({e["set"] for e in res["eval"].values()})
    lines += ["", "## Accuracy of the chosen run of each method", ""]
    header = "| row | lr | trainable |"
    for s in sets:
        header += f" {s} ({'strict / flexible' if s == 'gsm8k' else 'math_verify / strict'}) | {s} no answer |"
    lines += [header, "|---|---|---|" + "---|---|" * len(sets)]
    rows = ["base"] + [r for r in sel if r != "base"]
    for row in rows:
        job = res["train"].get(sel.get(row, ""), {})
        cells = f"| {row} | {job.get('lr', '-') if row != 'base' else '-'} | " \
                f"{format(job['trainable'], ',') if job.get('trainable') else '-'} |"
        for s in sets:
            e = res["eval"].get(f"{row}/{s}")
            if not e or e.get("status") != "ok":
                cells += " not run | |"
                continue
            acc = list(e["accuracy"].values())
            cnt = list(e["correct"].values())
            cells += (f" {100 * acc[0]:.2f}% / {100 * acc[1]:.2f}% ({cnt[0]}/{cnt[1]} of {e['n']}) | "
                      f"{e['no_answer']} |")
        lines.append(cells)
    samp = next((e["sampling"] for e in res["eval"].values() if e.get("sampling")), None)
    lines += ["", f"Eval: greedy, sampling {json.dumps(samp)}, backend "
                  f"{next((e['backend'] for e in res['eval'].values() if e.get('backend')), '?')}.", ""]
    paired = Path(f"{stem}_compare.md")
    if paired.exists():
        lines += [f"Paired on the same problems (differences with 95% intervals, McNemar): [{paired.name}]"
                  f"({paired.name}).", ""]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = {}
    for name, e in sorted(res["train"].items()):
        if e.get("status") != "ok":
            continue
        c = colors.setdefault(e["row"], f"C{len(colors)}")
        style = "-" if sel.get(e["row"]) == name else ":"
        if e["loss_curve"]:
            axes[0].plot(*zip(*e["loss_curve"]), style, color=c, lw=1,
                         label=f"{e['row']} lr {e['lr']:g}" if style == "-" else None)
        if e["heldout_curve"]:
            axes[1].plot(*zip(*e["heldout_curve"]), style + "o", color=c, ms=3)
    axes[0].set(title="training loss (solid: chosen lr; dotted: others)", xlabel="step", ylabel="loss")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    axes[1].set(title="held-out loss (training rows held out)", xlabel="step", ylabel="loss")
    gsm = [(row, res["eval"].get(f"{row}/gsm8k")) for row in rows]
    for i, (row, e) in enumerate(gsm):
        if not e or e.get("status") != "ok":
            continue
        job = res["train"].get(sel.get(row, ""), {})
        x = job.get("trainable") or 1
        acc = 100 * list(e["accuracy"].values())[0]
        axes[2].scatter([x], [acc], color=colors.get(row, "k"))
        # alternate label sides: rows with near-equal accuracy and size (EDoRA, LoRA-XS) stay readable
        axes[2].annotate(row, (x, acc), fontsize=8, xytext=(5, -10 if i % 2 else 4), textcoords="offset points")
    axes[2].set(xscale="log", title="GSM8K strict accuracy vs trainable parameters (base at x=1)",
                xlabel="trainable parameters", ylabel="accuracy %")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


def file_sha256(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.gguf"))
    else:
        files = [p]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.budget_s if args.budget_s else None
    work = Path(args.work).resolve()
    path = Path(args.results) if args.results else RESULTS / f"method_compare_{args.label}.json"
    res = load_results(path, args)
    save = lambda: save_results(path, res)  # noqa: E731
    if args.phase != "report" and not res["meta"].get("model_sha256") and not args.model.startswith("pkg://"):
        res["meta"]["model_sha256"] = file_sha256(args.model)
    res["meta"]["train_jobs"] = sum(len(lrs) for _, lrs, _ in grids(args).values())
    res["meta"]["notes"] = res["meta"].get("notes", []) + [n for n in args.note if n not in res["meta"].get("notes", [])]
    if args.phase in ("train", "all"):
        run_jobs(train_jobs(args, res, work, save), args.parallel, deadline)
    res["selected"] = selected(res, args)
    if args.phase in ("eval", "all"):
        run_jobs(eval_jobs(args, res, work, save), args.parallel, deadline)
    if args.phase != "report":
        commit = os.environ.get("EDORA_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        res["meta"].update(command="python benchmarks/method_compare.py " + " ".join(sys.argv[1:] if argv is None
                                                                                         else argv),
                           commit=commit or "?", machine=machine())
    save()
    stem = RESULTS / f"method_compare_{args.label}" if not args.results else path.with_suffix("")
    evals.compare_evals(args, res, work, stem, EVAL_TASK)
    write_report(res, stem)
    print(Path(str(path.with_suffix("")) + ".md").read_text()[-3000:])
    if args.export:
        evals.export_run(args, res, work, path)
    return 0


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
