"""Markdown + PNG (tokens/s vs GPUs) of a train_scaling.py result: `python benchmarks/train_scaling_report.py R.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _n(x, fmt="{:,}") -> str:
    return "-" if x is None else fmt.format(x)


def _list(xs, fmt="{:.2f}") -> str:
    return "-" if not xs else " / ".join(fmt.format(x) for x in xs)


def markdown(r: dict) -> str:
    m, s, sh = r["machine"], r["settings"], r["model"]
    lines = [
        "# Multi-GPU scaling under DeepSpeed ZeRO-3 (`pipeline train` under `accelerate launch`)", "",
        f"Machine: {m['gpu'] or 'CPU'} (x{m['gpus']} visible), torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, trl {m['trl']}. Code {r['code']}. Command: `{r['command']}`.", "",
        f"Model: Mistral-7B's layer shape (hidden {sh['d']}, MLP {sh['f']}) with {sh['L']} layers, vocabulary "
        f"{sh['V']:,}, random weights" + (" (tiny CPU model, float32, gloo)" if s["tiny"] else "") + ". "
        f"Per-device batch {s['batch']} x accumulation {s['accum']}, max length {s['max_length']}, option set "
        f"`{s['set']}`; {s['warmup']} warm-up + {s['measure']} measured steps. Each rank reads its own rows, so "
        "every GPU does the same work per step at every N.", "",
        "tokens/s: non-padding tokens of the measured steps, summed over ranks (each rank over its own window); "
        "efficiency = per-GPU tokens/s at N over per-GPU tokens/s at N = 1. Init: EDoRA's SVD init under ZeRO-3 "
        "(every rank gathers every weight; rank i computes the SVDs of layers i, i+N, ...; the factors are "
        "broadcast), seconds per rank, synchronized around each call.", "",
        "| base | method | N | status | tokens/s | per GPU | efficiency | step s | MFU | peak GiB per rank | "
        "SVDs per rank | SVD s per rank | gather s per rank | broadcast s per rank | init s (slowest rank) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        if x["status"] != "ok":
            lines.append(f"| {x['base']} | {x['method']} | {x['nproc']} | {x['status']}: "
                         f"{x.get('error', '')[:160].replace('|', '/').replace(chr(10), ' ')} |" + " |" * 11)
            continue
        i = x["init"]
        mfu = x.get("mfu")
        lines.append(
            f"| {x['base']} | {x['method']} | {x['nproc']} | ok | {_n(x.get('tokens_per_s'))} "
            f"| {_n(x.get('tokens_per_s_per_gpu'))} | {_n(x.get('scaling_efficiency'), '{:.2f}')} "
            f"| {_n(x.get('step_s'))} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} "
            f"| {_list(x.get('peak_gpu_gib_per_rank'))} | {_list(i['svd_calls_per_rank'], '{}')} "
            f"| {_list(i['svd_s_per_rank'])} | {_list(i['gather_s_per_rank'])} | {_list(i['broadcast_s_per_rank'])} "
            f"| {_n(i['inject_s'], '{:.2f}')} |")
    if r.get("merge_checks"):
        lines += ["", "## Save / merge check", "",
                  "The adapter rank 0 saved, merged by `pipeline merge` (verification on); the merged model's logits "
                  "against the sharded model's on fixed prompts. Pass: merge verification passed, rel diff <= "
                  "tolerance and argmax agreement >= the minimum (pipeline/merging/verify.py's gates).", "",
                  "| base | method | N | dtype | merge verification | max abs diff | rel diff (tol) | argmax agree (min) "
                  "| passed |", "|---|---|---|---|---|---|---|---|---|"]
        for c in r["merge_checks"]:
            v = c.get("merge_verification") or {}
            lines.append(
                f"| {c['base']} | {c['method']} | {c['nproc']} | {c['dtype']} | {v.get('passed', '-')} "
                f"| {_n(c.get('max_abs_logit_diff'), '{:.3g}')} | {_n(c.get('rel_logit_diff'), '{:.3g}')} "
                f"({c['tolerance_rel']}) | {_n(c.get('argmax_agreement'), '{:.3f}')} ({c['min_argmax_agreement']}) "
                f"| {c['passed']}" + (f": {c['error'][:200]}" if c.get("error") else "") + " |")
    lines += [""] + [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [x for x in r["runs"] if x["status"] == "ok" and x.get("tokens_per_s")]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys((x["base"], x["method"]) for x in ok):
        xs = sorted((x for x in ok if (x["base"], x["method"]) == key), key=lambda x: x["nproc"])
        ns = [x["nproc"] for x in xs]
        axes[0].plot(ns, [x["tokens_per_s"] for x in xs], marker="o", label=" ".join(key))
        axes[1].plot(ns, [x["tokens_per_s_per_gpu"] for x in xs], marker="o", label=" ".join(key))
        one = next((x for x in xs if x["nproc"] == 1), None)
        if one:  # perfect scaling from N = 1
            axes[0].plot(ns, [one["tokens_per_s"] * n for n in ns], ls=":", color="grey", lw=0.8)
    axes[0].set_ylabel("non-padding tokens/s (all GPUs; dotted: linear from N = 1)")
    axes[1].set_ylabel("tokens/s per GPU")
    for ax in axes:
        ax.set_xlabel("GPUs (processes)")
        ax.set_xticks(sorted({x["nproc"] for x in ok}))
        ax.legend(fontsize=8)
    fig.suptitle(f"ZeRO-3 scaling, {r['model']['L']} layers, {r['machine']['gpu'] or 'CPU'}, {r['code']}")
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
