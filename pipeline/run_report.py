"""runs/<name>/report.md of `pipeline run`: base and fine-tuned side by side, training, merge and timings, with
before_after.png."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(run_dir: Path, name: str, timings: dict | None = None) -> Path:
    from pipeline.compare import run_comparison
    from pipeline.trainer import read_metrics

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
