"""Markdown tables and PNG charts from the benchmark JSON files in benchmarks/results/.

    python benchmarks/report.py      # writes step_time.md/.png, init_time.md, train_7b_shape.md, eval_throughput.md/.png
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

R = Path(__file__).resolve().parent / "results"
SHIPPED = "335d612"


def step_time() -> None:
    d = json.loads((R / "step_time.json").read_text())
    rows = d["runs"]
    lines = ["# Train-step time: EDoRA vs PEFT LoRA / DoRA", "", d["what"] + ".", "", f"Machine: {d['machine']}.", ""]

    def table(title, sel):
        out = [f"## {title}", "", "| variant | r | layers | batch | base | mode | step ms | tokens/s | peak GiB | "
               "trainable | vs LoRA | vs DoRA |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            same = [x for x in sel if (x["r"], x["layers"], x["batch"], x["base"], x["mode"]) ==
                    (r["r"], r["layers"], r["batch"], r["base"], r["mode"])]
            ref = {x["variant"]: x.get("step_ms") for x in same}
            ms = r.get("step_ms")

            def ratio(v, ms=ms, ref=ref):
                return f"{ms / ref[v]:.2f}x" if ms and ref.get(v) else "-"

            out.append(f"| {r['variant']} | {r['r']} | {r['layers']} | {r['batch']}x{r['seq']} | {r['base']} | "
                       f"{r['mode']} | {ms if ms else r.get('error')} | {r.get('tokens_per_s', '-')} | "
                       f"{r.get('peak_gib', '-')} | {r.get('trainable_params', '-'):,} | {ratio('lora')} | "
                       f"{ratio('dora')} |")
        return out + [""]

    shipped = [r for r in rows if r["code"].startswith(SHIPPED)]
    lines += table(f"The shipped code ({SHIPPED}), r = 64, 8 layers, batch 2x512", shipped)
    lines += [f"Command: `{shipped[0]['command']}` and `{shipped[-1]['command']}`.", ""]
    grid = [r for r in rows if r["code"].startswith("1984e5f") and r["mode"] == "eager"]
    lines += table("Eager grid (code 1984e5f: the first fused version; the shipped one differs only in fusing x Aᵀ "
                   "and B R into the same node, measured equal within noise at the target point)", grid)
    lines += [f"Command: `{grid[0]['command']}`.", "", "## History at the target point (r = 64, 8 layers, 2x512, bf16)", "",
              "| code | variant | mode | step ms | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if r["layers"] == 8 and r["batch"] == 2 and r["r"] == 64 and r["base"] == "bf16" and r["variant"] == "edora":
            lines.append(f"| {r['code']} | {r['variant']} | {r['mode']} | {r.get('step_ms')} | {r.get('peak_gib')} |")
    lines += ["", "## Where the time goes (torch.profiler, 3 steps, r = 64, 8 layers, 2x512, bf16)", "",
              "| profile | GPU busy ms / step | host (CPU) ms / step, profiled | file |", "|---|---|---|---|"]
    for name, label in [("lora_eager.txt", "PEFT LoRA, eager"), ("edora_eager_bd4ed4f.txt", "EDoRA bd4ed4f, eager"),
                        ("edora_eager_1984e5f.txt", "EDoRA 1984e5f, eager"),
                        ("edora_compiled_335d612.txt", "EDoRA 335d612 (shipped), torch.compile")]:
        text = (R / "profiles" / name).read_text()
        cpu = float(text.split("Self CPU time total: ")[1].split("ms")[0])
        gpu = float(text.split("Self CUDA time total: ")[1].split("ms")[0])
        lines.append(f"| {label} | {gpu / 3:.1f} | {cpu / 3:.1f} | profiles/{name} |")
    lines += ["", "EDoRA keeps the GPU busy for less time than LoRA (no weight gradients for A and B, a rank-r "
              "product instead of two rank-r projections), so the eager gap at batch 2x512 is host-side: the "
              "per-layer adapter arithmetic is many small kernels (about 20 per adapted layer per step; 56 adapted layers "
              "here, 224 in a 32-layer model), launched from Python. The step is bound by launching them, not by running them: at 8x512 "
              "the same code beats LoRA (0.78x) and uses 15% less memory. Fusing the adapter path into one autograd "
              "node (335d612) halved the compiled step (64.9 -> 36.5 ms) but left eager within noise "
              "(~91-95 ms). What would close the eager gap at small batches: CUDA graphs, or one batched "
              "computation of the per-step parameter terms (B R, the norm, m / n) for all layers at once."]
    (R / "step_time.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (base, mode) in zip(axes, [("bf16", "eager"), ("bf16", "compile"), ("nf4", "eager")]):
        sel = [r for r in shipped if r["base"] == base and r["mode"] == mode and r.get("step_ms")]
        names = [r["variant"] for r in sel]
        vals = [r["step_ms"] for r in sel]
        colors = ["#999999" if n == "floor" else "#d62728" if n == "edora" else "#1f77b4" for n in names]
        ax.bar(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(f"{base} base, {mode}")
        ax.set_ylabel("ms / train step (lower is better)")
    fig.suptitle("Mistral-7B-shaped, 8 layers, r=64, batch 2x512, one H100 (code " + SHIPPED + ")")
    fig.tight_layout()
    fig.savefig(R / "step_time.png", dpi=110)
    plt.close(fig)


def init_time() -> None:
    d = json.loads((R / "init_time.json").read_text())
    lines = ["# EDoRA initialisation time (Mistral-7B shape, 32 layers x 7 projections, r = 64)", "",
             f"Machine: {d['machine']}. Command: `{d['command'].replace('/root/out/', 'benchmarks/results/')}`.", "",
             "| SVD | seconds |", "|---|---|",
             f"| randomized (default: q = r + 16, 4 power iterations), all 32 layers | {d['randomized_32_layers_s']} |",
             f"| exact (torch.linalg.svd), {d['exact_layers_timed']} layers timed | {d['exact_s_timed']} |",
             f"| exact, 32 layers (extrapolated linearly) | {d['exact_32_layers_s_extrapolated']} |", "",
             "Approximation error accepted by the randomized SVD, on these random (flat-spectrum: the worst case) "
             "weights: `residual_over_optimal` = ||W - B A||_F² over the optimal rank-64 residual.", "",
             "| shape | residual / optimal | energy captured | optimal energy captured |", "|---|---|---|---|"]
    for e in d["randomized_error_random_weights"]:
        lines.append(f"| {e['shape']} | {e['residual_over_optimal']} | {e['captured_energy']} | "
                     f"{e['optimal_captured_energy']} |")
    lines += ["", "On a decaying spectrum like a pretrained weight's, the CPU test "
              "`test_randomized_svd_is_near_optimal_on_a_decaying_spectrum` holds the residual within 1% of optimal."]
    (R / "init_time.md").write_text("\n".join(lines) + "\n")


def train_7b() -> None:
    d = json.loads((R / "train_7b_shape.json").read_text())
    lines = ["# Mistral-7B-shaped training through the CLI (random weights, 32 layers)", "",
             f"Machine: {d['machine']}. Code {d['code']}. Settings: {json.dumps(d['settings'])}.", "",
             "Recipe settings (per-device batch 2, max length 512, bf16, gradient checkpointing, r = 64, all seven "
             "projections, lr 4e-3 cosine) with gradient accumulation cut to 4 so a step takes seconds.", "",
             "| run | step s | tokens/s | peak GPU GiB | trainable | losses |", "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['run']} | {r.get('step_s')} | {r.get('tokens_per_s')} | {r.get('peak_gpu_gib')} | "
                     f"{r.get('trainable_params')} | {r.get('losses')} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in d["runs"]]
    (R / "train_7b_shape.md").write_text("\n".join(lines) + "\n")


def eval_throughput() -> None:
    d = json.loads((R / "eval_throughput.json").read_text())
    lines = ["# Eval generation throughput: vLLM vs transformers (GSM8K test prompts, greedy, 1,024 new tokens)", "",
             f"Machine: {d['machine']}.", "", f"Model: {d['model']}.", "", d["note"] + ".", "",
             "| backend | prompts | generated tokens | generate s | tokens/s | load s |", "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['backend']} | {r['prompts']} | {r['generated_tokens']:,} | {r['generate_s']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['load_s']:.0f} |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in d["commands"]]
    (R / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [r["backend"] for r in d["runs"]]
    vals = [r["tokens_per_s"] for r in d["runs"]]
    ax.bar(names, vals, color=["#d62728", "#1f77b4"][: len(vals)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("GSM8K, Mistral-7B shape, one H100")
    fig.tight_layout()
    fig.savefig(R / "eval_throughput.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    step_time()
    init_time()
    train_7b()
    eval_throughput()
    print("wrote", *sorted(p.name for p in R.glob("*.md")))
