"""Markdown + PNG of a train_throughput.py result: `python benchmarks/train_throughput_report.py RESULT.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPLIT = ("between_steps", "prep", "forward", "backward", "optimizer", "other", "unaccounted")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:,}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    m, s, shape = r["machine"], r["settings"], r["model"]
    lines = [
        "# Training throughput through `pipeline train` (EDoRA vs PEFT LoRA / DoRA, recipe options)", "",
        f"Machine: {m['gpu'] or 'CPU'} (x{m['gpus']}), torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, trl {m['trl']}, Python {m['python']}. Code {r['code']}. Command: `{r['command']}`.", "",
        f"Model: Mistral-7B's layer shape (hidden {shape['d']}, MLP {shape['f']}, KV width {shape['kv']}) with "
        f"{shape['L']} layers, vocabulary {shape['V']:,}, random weights"
        + (" (tiny CPU model)" if s["tiny"] else ", bf16") + f". Rows: {s['data']} (max length {s['max_length']}); "
        f"batch {s['batch']} x accumulation {s['accum']}; steps {s['warmup']} warm-up + {s['measure']} measured"
        + ("" if s["no_profile"] or s["tiny"] else " + 1 profiled") + ". Every run is `pipeline train` on "
        "recipes/mistral-7b/<method>-metamathqa.yaml with the set's training options.", "",
        "tokens/s: non-padding tokens of the measured steps over their wall time. "
        + (f"MFU / HFU: model / hardware FLOPs per second over {r['peak_tflops']} TFLOP/s ({r['peak_source']}). "
           if r["peak_tflops"] else "MFU / HFU: not computed (no peak FLOP/s on a CPU). ")
        + "Split: ms per step; between = host time between steps (next micro-batches fetched, logging); "
        "prep/forward/backward/optimizer/other are device time between CUDA events (they include the GPU waiting for the host); kernels = share of the profiled "
        "step the GPU spent in kernels.", "",
        "| set | method | tokens/s | vs plain | padding | step s | MFU | HFU | 32-layer tokens/s (same FLOP/s) | "
        "peak GiB | split ms: " + " / ".join(SPLIT) + " (step) | kernels | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = {x["method"]: x.get("tokens_per_s") for x in r["runs"] if x["set"] == "plain" and x["status"] == "ok"}
    for x in r["runs"]:
        if x["status"] != "ok":
            lines.append(f"| {x['set']} | {x['method']} | {x['status']}: {x.get('error', '')[:200]} |" + " |" * 10)
            continue
        sp = x.get("split_ms_per_step", {})
        split = " / ".join(_num(sp.get(k), "{:.0f}") for k in SPLIT) + f" ({_num(sp.get('step_wall'), '{:.0f}')})"
        base = plain.get(x["method"])
        ratio = f"{x['tokens_per_s'] / base:.2f}x" if base and x.get("tokens_per_s") else "-"
        prof = x.get("profile") or {}
        losses = x.get("losses") or []
        first_last = f"{losses[0]} -> {losses[-1]}" if losses else "-"
        lines.append(
            f"| {x['set']} | {x['method']} | {_num(x.get('tokens_per_s'))} | {ratio} "
            f"| {_pct(x.get('padding_fraction'))} | {_num(x.get('step_s'))} | {_pct(x.get('mfu'))} "
            f"| {_pct(x.get('hfu'))} | "
            f"{_num(x.get('projected_32_layer_tokens_per_s'))} | {_num(x.get('peak_gpu_gib'))} | {split} | "
            f"{_pct(prof.get('kernel_fraction'))} | {first_last} |")
    lines += ["", "Options per set: " + "; ".join(sorted({f"{x['set']} = {json.dumps(x.get('options', {}))}"
                                                          for x in r["runs"]})), "",
              "FLOPs counted (benchmarks/flops.py):", "", "```", r["flops_formula"], "```", ""]
    for x in r["runs"]:
        top = (x.get("profile") or {}).get("top_kernels")
        if top:
            lines += [f"Top kernels, {x['set']} {x['method']} (profiled step):", ""]
            lines += [f"- {k['ms']} ms x{k['calls']}: `{k['name']}`" for k in top[:8]] + [""]
    return "\n".join(lines) + "\n"


def plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [x for x in r["runs"] if x["status"] == "ok"]
    methods = list(dict.fromkeys(x["method"] for x in ok))
    sets = list(dict.fromkeys(x["set"] for x in ok))
    if not ok:
        return
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(5 * (1 + len(methods)), 4))
    width = 0.8 / max(len(methods), 1)
    for i, meth in enumerate(methods):
        vals = [next((x.get("tokens_per_s") or 0 for x in ok if x["set"] == st and x["method"] == meth), 0)
                for st in sets]
        axes[0].bar([j + i * width for j in range(len(sets))], vals, width, label=meth)
    axes[0].set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(sets))], sets, rotation=30)
    axes[0].set_ylabel("non-padding tokens/s")
    axes[0].legend()
    for ax, meth in zip(axes[1:], methods):
        for x in ok:
            if x["method"] == meth and x.get("losses"):
                ax.plot(range(1, len(x["losses"]) + 1), x["losses"], marker=".", label=x["set"])
        ax.set_title(f"{meth}: loss per step")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.suptitle(f"pipeline train, {r['model']['L']} layers, {r['machine']['gpu'] or 'CPU'}, {r['code']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(result: dict, prefix: Path) -> None:
    prefix = Path(prefix)
    prefix.with_suffix(".md").write_text(markdown(result))
    plot(result, prefix.with_suffix(".png"))


if __name__ == "__main__":
    path = Path(sys.argv[1])
    write_report(json.loads(path.read_text()), path.with_suffix(""))
