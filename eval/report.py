"""Summaries from graded samples: accuracies (overall, by MATH subject and level), report.md and a PNG."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)


def _acc(rows: list[dict], metric: str) -> float:
    return sum(r["scores"][metric] for r in rows) / len(rows) if rows else 0.0


def task_summary(rows: list[dict], metrics: list[str]) -> dict:
    """Accuracy per metric, counts and invalid answers; by subject and level where samples carry them."""
    out = {"n": len(rows), "accuracy": {m: _acc(rows, m) for m in metrics},
           "correct": {m: sum(r["scores"][m] for r in rows) for m in metrics},
           "invalid": sum(r["scores"]["invalid"] for r in rows)}
    if "pred_flexible" in (rows[0]["scores"] if rows else {}):
        out["invalid_flexible"] = sum(r["scores"]["pred_flexible"] is None for r in rows)
    # answer-format compliance: the completion ends its reasoning with MetaMath's `The answer is: <answer>`
    out["answer_format"] = sum(has_answer_line(r.get("completion", "")) for r in rows) / len(rows) if rows else 0.0
    for key in ("subject", "level"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r.get(key) is not None:
                groups[str(r[key])].append(r)
        if groups:
            out[f"by_{key}"] = {g: {"n": len(rs), **{m: _acc(rs, m) for m in metrics}}
                                for g, rs in sorted(groups.items())}
    return out


def has_answer_line(completion: str) -> bool:
    from eval.extract import after_answer_prefix

    text = after_answer_prefix(completion or "")
    return text is not None and text.strip() != ""


def no_answer(t: dict, metric: str) -> int:
    """Completions without an answer for this metric: the flexible reading finds a number more often."""
    return t.get("invalid_flexible", t["invalid"]) if metric == "flexible" else t["invalid"]


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)  # atomic: an interrupted write never leaves half a summary
    return path


def write_markdown(out_dir: Path, summary: dict, plot_name: str | None) -> Path:
    lines = [f"# Evaluation: {summary['model']}", "",
             f"backend `{summary['backend']}`, sampling `{json.dumps(summary.get('sampling'))}`, "
             f"wall time {summary['wall_time_s']:.0f} s, generated tokens/s {summary['generated_tokens_per_s']:.1f}",
             "", "| task | n | metric | accuracy | correct | no answer | data (sha256) |", "|---|---|---|---|---|---|---|"]
    for name, t in summary["tasks"].items():
        src = summary["data"][name]
        for m, acc in t["accuracy"].items():
            lines.append(f"| {name} | {t['n']} | {m} | {100 * acc:.2f}% | {t['correct'][m]} | {no_answer(t, m)} | "
                         f"`{src['source']}` ({src['sha256'][:12]}) |")
    lines.append("")
    for name, t in summary["tasks"].items():
        if "answer_format" in t:
            lines.append(f"- {name}: {100 * t['answer_format']:.1f}% of the answers end with `The answer is: ...`")
        if t.get("gold_loss"):
            g = t["gold_loss"]
            lines.append(f"- {name}: loss of the gold solutions (teacher-forced) {g['loss']:.4f} nats/token "
                         f"over {g['n']} problems ({g['tokens']} tokens)")
    for name, t in summary["tasks"].items():
        for key in ("subject", "level"):
            groups = t.get(f"by_{key}")
            if not groups:
                continue
            metrics = list(t["accuracy"])
            lines += ["", f"## {name} by {key}", "", f"| {key} | n | " + " | ".join(metrics) + " |",
                      "|---|---|" + "---|" * len(metrics)]
            for g, v in groups.items():
                lines.append(f"| {g} | {v['n']} | " + " | ".join(f"{100 * v[m]:.1f}%" for m in metrics) + " |")
    if plot_name:
        lines += ["", f"![accuracy]({plot_name})"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_plot(out_dir: Path, summary: dict) -> Path | None:
    """Bars: accuracy per task and metric; MATH by subject and by level when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    if not tasks:
        return None
    panels = [("accuracy per task", {f"{n}\n{m}": a for n, t in tasks.items() for m, a in t["accuracy"].items()})]
    if len(panels[0][1]) > 8:  # a suite: each task's headline metric only, or the bars cannot be read
        panels = [("headline accuracy per task", {f"{n}\n{next(iter(t['accuracy']))}": next(iter(
            t["accuracy"].values())) for n, t in tasks.items()})]
    for name, t in tasks.items():
        headline = next(iter(t["accuracy"]))
        for key in ("subject", "level"):
            if t.get(f"by_{key}"):
                panels.append((f"{name} by {key} ({headline})",
                               {g: v[headline] for g, v in t[f"by_{key}"].items()}))
    cols = min(4, len(panels))  # the suite has a dozen panels: wrap them into rows
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, values) in zip(axes.flat, panels):
        bars = ax.bar(range(len(values)), [100 * v for v in values.values()], color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        tilt = max(len(k) for k in values) > 8
        ax.set_xticks(range(len(values)), list(values), rotation=40 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=7)
        ax.set_ylim(0, 110)
        if not any(values.values()):  # an empty chart says nothing: say why it is empty
            ax.text(0.5, 0.5, "every accuracy is 0%:\nno correct answer in these samples", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="tab:red")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=9)
    fig.suptitle(summary["model"], fontsize=9)
    fig.tight_layout()
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
