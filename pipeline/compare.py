"""`python -m pipeline compare DIR [DIR ...]`: several models' eval results side by side.

Each DIR is an eval dir (summary.json + samples.jsonl, as `pipeline eval` writes them) or a run dir holding one or
more (`runs/<name>/eval`, `eval_*`, `eval-*`; those of one evaluated model form one column). Writes compare.md (one
table: tasks x metrics x models, with counts; then a paired note per pair of models on the problems both answered:
the accuracy difference with a paired bootstrap 95% interval and the exact McNemar test), compare.png and
compare.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from itertools import combinations
from pathlib import Path

from pipeline.errors import UserError

logger = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 10_000
SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_EVAL_DIR",
                        help="eval dirs (with summary.json and samples.jsonl) or run dirs holding eval/ or eval_*/")
    parser.add_argument("--labels", help="comma-separated names for the models, in order (default: from the dirs)")
    parser.add_argument("--out", default="runs/compare", help="output dir (default runs/compare)")


# --- statistics: pure functions -------------------------------------------------------------------------------------

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b and c are the discordant pairs (only A right, only B right); under the null
    each is Binomial(b + c, 1/2). p = min(1, 2 * P(X <= min(b, c)))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[int], b: list[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED
                     ) -> tuple[float, float]:
    """95% percentile interval of mean(b) - mean(a), resampling problems (pairs) with replacement.

    Each pair's difference is -1, 0 or +1, so a resample is fully described by how many of each it drew: a
    multinomial draw, the same distribution as resampling indices, in O(samples) memory."""
    import numpy as np

    n = len(a)
    if n == 0:
        return 0.0, 0.0
    plus = sum(y and not x for x, y in zip(a, b))
    minus = sum(x and not y for x, y in zip(a, b))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [plus / n, minus / n, (n - plus - minus) / n], size=samples)
    means = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired(a_rows: dict[str, dict], b_rows: dict[str, dict], metric: str, seed: int = SEED) -> dict:
    """Accuracy difference B - A on the problems both graded (same id, question and gold), with its interval and
    McNemar's test."""
    def problem(row: dict) -> tuple:
        return row.get("question"), row.get("gold")

    common = [i for i in sorted(set(a_rows) & set(b_rows)) if problem(a_rows[i]) == problem(b_rows[i])]
    a = [int(a_rows[i]["scores"][metric]) for i in common]
    b = [int(b_rows[i]["scores"][metric]) for i in common]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    lo, hi = paired_bootstrap(a, b, seed=seed)
    return {"n": len(common), "acc_a": sum(a) / len(a) if a else 0.0, "acc_b": sum(b) / len(b) if b else 0.0,
            "diff": (only_b - only_a) / len(common) if common else 0.0, "ci95": [lo, hi], "only_a": only_a,
            "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


# --- reading eval dirs ----------------------------------------------------------------------------------------------

def find_eval_dirs(path: Path) -> list[Path]:
    """An eval dir itself, or the eval dirs of a run dir (eval/, eval_*/, eval-*/)."""
    if (path / "summary.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("eval*/summary.json"))
    if not found:
        raise UserError(f"{path}: no summary.json there, nor in {path}/eval*/; pass an eval dir (written by "
                        "`python -m pipeline eval`) or a run dir that has one")
    return found


def load_eval(path: Path) -> dict:
    summary = json.loads((path / "summary.json").read_text())
    rows: dict[str, dict[str, dict]] = {}
    samples = path / "samples.jsonl"
    if samples.is_file():
        with samples.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row["task"], {})[str(row["id"])] = row
    else:
        logger.warning("%s has no samples.jsonl: its paired comparisons are skipped", path)
    return {"path": str(path), "summary": summary, "rows": rows}


def combine(evals: list[dict]) -> dict:
    """One model's evals kept in several dirs (one per task, as benchmarks/method_compare.py writes them) as one."""
    if len(evals) == 1:
        return evals[0]
    tasks, rows, seen = {}, {}, {}
    for e in evals:
        for task, t in e["summary"]["tasks"].items():
            if task in seen:
                raise UserError(f"{seen[task]} and {e['path']} both hold {task} results of "
                                f"{e['summary'].get('model')}; pass the eval dir you mean instead of the run dir")
            seen[task], tasks[task] = e["path"], t
            rows[task] = e["rows"].get(task, {})
    first = evals[0]["summary"]
    summary = {"model": first.get("model"), "tasks": tasks, "limit": first.get("limit"),
               "backend": "+".join(sorted({str(e["summary"].get("backend")) for e in evals}))}
    return {"path": ", ".join(e["path"] for e in evals), "summary": summary, "rows": rows}


BASE_DIRS = ("eval-base", "eval_base")  # where `pipeline run --baseline` keeps the base model's eval


def label_of(eval_dir: Path) -> str:
    """runs/<name>/eval -> <name>; runs/<name>/eval-base -> <name>/base; any other eval dir -> its own name."""
    d = eval_dir.resolve()
    if d.name in ("eval", ""):
        return d.parent.name
    return f"{d.parent.name}/base" if d.name in BASE_DIRS else d.name


def models_in(path: Path) -> list[tuple[str, dict]]:
    """(label, eval) per model a dir holds: an eval dir is one; a run dir's eval dirs of the same evaluated model are
    one (labelled with the run's name), of different models (e.g. the base model beside the fine-tuned one) several,
    the base model's first (labelled run/base, run, run/<dir>)."""
    dirs = find_eval_dirs(path)
    if dirs == [path]:
        return [(label_of(path), load_eval(path))]
    groups: dict[str, list[dict]] = {}
    for d in sorted(dirs, key=lambda d: d.name not in BASE_DIRS):
        e = load_eval(d)
        groups.setdefault(str(e["summary"].get("model")), []).append(e)
    if len(groups) == 1:
        return [(path.resolve().name, combine(next(iter(groups.values()))))]
    return [(label_of(Path(g[0]["path"])), combine(g)) for g in groups.values()]


# --- the comparison -------------------------------------------------------------------------------------------------

def compare(evals: list[dict], labels: list[str]) -> dict:
    """Table rows (task, metric, per model: accuracy, correct, n) and paired notes for every pair of models."""
    tasks: list[str] = []
    for e in evals:
        tasks += [t for t in e["summary"]["tasks"] if t not in tasks]
    table, pairs = [], []
    for task in tasks:
        metrics: list[str] = []
        for e in evals:
            metrics += [m for m in e["summary"]["tasks"].get(task, {}).get("accuracy", {}) if m not in metrics]
        for metric in metrics:
            cells = {}
            for e, label in zip(evals, labels):
                t = e["summary"]["tasks"].get(task)
                if t and metric in t["accuracy"]:
                    cells[label] = {"accuracy": t["accuracy"][metric], "correct": t["correct"][metric], "n": t["n"],
                                    "invalid": t["invalid"]}
            table.append({"task": task, "metric": metric, "models": cells})
            for (ea, la), (eb, lb) in combinations(zip(evals, labels), 2):
                ra, rb = ea["rows"].get(task), eb["rows"].get(task)
                if not ra or not rb or la not in cells or lb not in cells:
                    continue
                note = paired(ra, rb, metric)
                if note["n"]:
                    pairs.append({"task": task, "metric": metric, "a": la, "b": lb, **note})
    models = [{"label": label, "path": e["path"], "model": e["summary"].get("model"),
               "backend": e["summary"].get("backend"), "limit": e["summary"].get("limit")}
              for e, label in zip(evals, labels)]
    return {"models": models, "table": table, "pairs": pairs,
            "method": {"interval": f"paired bootstrap over problems, {BOOTSTRAP_SAMPLES} resamples, seed {SEED}, "
                                   "95% percentile interval of acc(B) - acc(A)",
                       "test": "exact two-sided McNemar (binomial on the discordant pairs)"}}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def write_markdown(out: Path, result: dict, plot_name: str, stem: str = "compare") -> Path:
    labels = [m["label"] for m in result["models"]]
    lines = ["# Comparison", "", "| model | dir | evaluated model | backend | limit |", "|---|---|---|---|---|"]
    lines += [f"| {m['label']} | `{m['path']}` | `{m['model']}` | {m['backend']} | {m['limit']} |"
              for m in result["models"]]
    lines += ["", "Accuracy (correct / n):", "", "| task | metric | " + " | ".join(labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for row in result["table"]:
        cells = []
        for label in labels:
            c = row["models"].get(label)
            cells.append(f"{_pct(c['accuracy'])} ({c['correct']}/{c['n']})" if c else "-")
        lines.append(f"| {row['task']} | {row['metric']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired on the same problems (B - A; only A / only B = problems one model got right and the other "
              "wrong):", "",
              "| task | metric | A | B | n | B - A | 95% interval | only A / only B | McNemar p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['task']} | {p['metric']} | {p['a']} | {p['b']} | {p['n']} | {_paired_cells(p)} |")
    if not result["pairs"]:
        lines.append("| (no pair of models graded the same problems: samples.jsonl missing or disjoint) |"
                     + " |" * 8)
    lines += ["", f"Interval: {result['method']['interval']}. Test: {result['method']['test']}. A difference whose "
              "interval excludes 0 and whose p < 0.05 is unlikely to be noise on these problems; it says nothing "
              "about other problems.", "", f"![comparison]({plot_name})"]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(out: Path, result: dict, stem: str = "compare") -> Path:
    """Horizontal grouped bars (a suite has many rows): one group per task and metric, one bar per model, n shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m["label"] for m in result["models"]]
    groups = result["table"]
    height = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * len(groups) * max(1, len(labels)) ** 0.8))
    for k, label in enumerate(labels):
        ys = [i + (k - (len(labels) - 1) / 2) * height for i, row in enumerate(groups) if label in row["models"]]
        xs = [100 * row["models"][label]["accuracy"] for row in groups if label in row["models"]]
        bars = ax.barh(ys, xs, height, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    names = []
    for row in groups:
        ns = sorted({c["n"] for c in row["models"].values()})
        names.append(f"{row['task']} {row['metric']} (n={'/'.join(map(str, ns))})")
    ax.set_yticks(range(len(groups)), names, fontsize=7)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 108)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy by task and metric", fontsize=9)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args) -> int:
    if getattr(args, "overrides", None):
        raise UserError(f"unknown arguments {' '.join(args.overrides)}; see `python -m pipeline compare --help`")
    models: list[tuple[str, dict]] = []
    for d in args.dirs:
        path = Path(d)
        if not path.is_dir():
            raise UserError(f"{path} is not a directory; pass eval dirs or run dirs")
        models += models_in(path)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [label for label, _ in models]
    if len(labels) != len(models):
        raise UserError(f"--labels names {len(labels)} models but the dirs hold {len(models)}: "
                        + "; ".join(e["path"] for _, e in models))
    if len(set(labels)) != len(labels):
        raise UserError(f"model labels repeat ({', '.join(labels)}); name them with --labels a,b,...")
    result = compare([e for _, e in models], labels)
    md = write_outputs(Path(args.out), result)
    print(md.read_text())
    logger.info("wrote %s (compare.md, compare.png, compare.json)", args.out)
    return 0


def write_outputs(out: Path, result: dict, stem: str = "compare") -> Path:
    """<stem>.json, <stem>.png and <stem>.md (returned) in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = write_plot(out, result, stem)
    return write_markdown(out, result, plot.name, stem)


def _paired_cells(p: dict) -> str:
    """change | 95% interval | only A / only B | McNemar p: the cells every paired table shows."""
    lo, hi = p["ci95"]
    return (f"{100 * p['diff']:+.2f} pts | [{100 * lo:+.2f}, {100 * hi:+.2f}] | {p['only_a']} / {p['only_b']} | "
            f"{p['mcnemar_p']:.3g}")


def run_comparison(run_dir: Path) -> list[str]:
    """For `pipeline run`'s report: when the run holds the base model's eval beside the fine-tuned one's, write
    runs/<name>/compare.{md,png,json} (labels base, fine-tuned) and return the report's paired lines."""
    base = next((run_dir / d for d in BASE_DIRS if (run_dir / d / "summary.json").is_file()), None)
    if base is None or not (run_dir / "eval" / "summary.json").is_file():
        return []
    result = compare([load_eval(base), load_eval(run_dir / "eval")], ["base", "fine-tuned"])
    write_outputs(run_dir, result)
    lines = ["## Is the change more than noise?", "",
             "Paired on the same problems: fine-tuned minus base, with the problems only one of them got right.", "",
             "| task | metric | n | change | 95% interval | only base / only fine-tuned | McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['task']} | {p['metric']} | {p['n']} | {_paired_cells(p)} |")
    if not result["pairs"]:
        lines.append("| (no problem graded in both evals: samples.jsonl missing or the problems differ) |" + " |" * 6)
    return lines + ["", f"{result['method']['interval']}; {result['method']['test']}. Details: compare.md "
                        "(`python -m pipeline compare` on eval-base/ and eval/).", ""]
