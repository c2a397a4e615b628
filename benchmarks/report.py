"""Markdown tables and PNG charts from the benchmark JSON files in benchmarks/results/.

    python benchmarks/report.py      # writes step_time.md/.png, init_time.md, train_7b_shape.md, eval_throughput.md/.png
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

R = Path(__file__).resolve().parent / "results"
SHIPPED = "3536c16"  # the fast path (batched step terms); later commits change no eager GPU kernel
REPEAT = "9e57934"  # the same fast path, measured in an earlier call


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

    def pick(code, variant, base="bf16", mode="eager"):
        return next((r for r in rows if r["code"].startswith(code) and r["variant"] == variant and r["base"] == base
                     and r["mode"] == mode and r["layers"] == 8 and r["batch"] == 2 and r["r"] == 64), {})

    def ratio(code, num, den, base="bf16", mode="eager"):
        a, b = pick(code, num, base, mode).get("step_ms"), pick(code, den, base, mode).get("step_ms")
        return a / b if a and b else None

    lines += ["## The targets (r = 64, 8 layers, batch 2x512), two runs of the same fast-path code", "",
              f"| target | run 1 ({SHIPPED}) | run 2 ({REPEAT}) | met |", "|---|---|---|---|"]
    checks = [
        ("eager EDoRA <= 0.9x PEFT LoRA", ratio(SHIPPED, "edora", "lora"), ratio(REPEAT, "edora", "lora"), 0.9),
        ("eager EDoRA <= 0.5x PEFT DoRA", ratio(SHIPPED, "edora", "dora"), ratio(REPEAT, "edora", "dora"), 0.5),
        ("NF4 base: EDoRA <= 0.6x PEFT QDoRA", ratio(SHIPPED, "edora", "dora", "nf4"),
         ratio(REPEAT, "edora", "dora", "nf4"), 0.6),
        ("compiled EDoRA <= compiled LoRA", ratio(SHIPPED, "edora", "lora", "bf16", "compile"),
         ratio(REPEAT, "edora", "lora", "bf16", "compile"), 1.0),
    ]
    for name, a, b, limit in checks:
        met = "yes" if a <= limit and b <= limit else "mean " + ("yes" if (a + b) / 2 <= limit else "no")
        lines.append(f"| {name} | {a:.2f}x | {b:.2f}x | {met} |")
    mem_e, mem_l = pick(SHIPPED, "edora").get("peak_gib"), pick(SHIPPED, "lora").get("peak_gib")
    lines.append(f"| peak memory <= PEFT LoRA's (bf16 eager) | {mem_e} vs {mem_l} GiB | "
                 f"{pick(REPEAT, 'edora').get('peak_gib')} vs {pick(REPEAT, 'lora').get('peak_gib')} GiB | "
                 f"{'yes' if mem_e <= mem_l else 'no'} |")
    lines += ["", "The two runs differ mostly in PEFT LoRA's own time (55.0 vs 62.2 ms): the eager ratio is 0.85x and "
              "0.93x, 0.89x on the mean, so the 0.9x target sits inside the run-to-run noise. "
              "Compiled, EDoRA measured 50.9 / 54.3 ms against LoRA's 27.5 / 27.3 ms: the target is not met. These "
              "compiled rows ran in the same process after all eager variants; the 36.5 ms of 335d612 came from a "
              "process that ran only the compile grid, and torch.compile runs the same per-layer op in both codes "
              "(on the CPU, inductor generates the same 135 kernels for a tiny model at 335d612, 3536c16 and now). "
              "The standalone profiles below show compiled EDoRA with less GPU time than compiled LoRA (18.4 vs "
              "25.7 ms per step) and about the same host time; why the measured step is twice LoRA's was not "
              "established (no device time left).", ""]
    lines += ["Variants: `edora` is the shipped training path (per-step terms of all layers batched by "
              "`EdoraStepTerms`, base matmul fused into the adapter node on bf16 bases; `EdoraApplyLinear` then, `EdoraApply` given W0 now); "
              "`edora-nofuse` batches the terms but keeps the base matmul separate (what runs on a 4-bit base); "
              "`edora-perlayer` is the per-layer fused op alone (the code before; still used for eval, ZeRO-3 "
              "and reentrant checkpointing). Under torch.compile the per-layer op runs (inductor fuses it).", ""]
    shipped = [r for r in rows if r["code"].startswith(SHIPPED)]
    repeat = [r for r in rows if r["code"].startswith(REPEAT)]
    lines += table(f"Run 1: code {SHIPPED}", shipped)
    lines += [f"Command: `{shipped[0]['command']}`. `allocated_before_gib` in the JSON shows that the variant "
              "after `edora` started with ~4 GiB still allocated (the previous model, freed only by a later "
              "garbage collection: EDoRA's load hooks were bound methods, a reference cycle; fixed after 3536c16, "
              "tested by `test_a_deleted_model_is_freed_at_once`). That inflates the peak of `edora-perlayer` / "
              "`edora-nofuse` and the NF4 floor; their own peaks are ~6.3 GiB (bf16) as in 335d612.", ""]
    lines += table(f"Run 2: code {REPEAT}", repeat)
    grid = [r for r in rows if r["code"].startswith("1984e5f") and r["mode"] == "eager"]
    lines += table("Eager grid (code 1984e5f: the per-layer fused op, before the batched step terms; the grid was "
                   "not re-run with the fast path)", grid)
    lines += [f"Command: `{grid[0]['command']}`.", "", "## History at the target point (r = 64, 8 layers, 2x512, bf16)",
              "", "| code | variant | mode | step ms | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if r["layers"] == 8 and r["batch"] == 2 and r["r"] == 64 and r["base"] == "bf16" and \
                r["variant"].startswith("edora"):
            lines.append(f"| {r['code']} | {r['variant']} | {r['mode']} | {r.get('step_ms')} | {r.get('peak_gib')} |")
    lines += ["", "## Where the time goes (torch.profiler, 3 steps, r = 64, 8 layers, 2x512, bf16)", "",
              "| profile | GPU busy ms / step | host (CPU) ms / step, profiled | file |", "|---|---|---|---|"]
    for name, label in [("lora_eager.txt", "PEFT LoRA, eager"), ("lora_eager_9e57934.txt", "PEFT LoRA, eager (again)"),
                        ("edora_eager_bd4ed4f.txt", "EDoRA bd4ed4f (plain autograd), eager"),
                        ("edora_eager_1984e5f.txt", "EDoRA 1984e5f (per-layer fused op), eager"),
                        ("edora_eager_9e57934.txt", "EDoRA 9e57934 (fast path), eager"),
                        ("edora_compiled_335d612.txt", "EDoRA 335d612, torch.compile"),
                        ("edora_compiled_3536c16.txt", "EDoRA 3536c16 (fast-path code), torch.compile"),
                        ("lora_compiled_3536c16.txt", "PEFT LoRA, torch.compile")]:
        text = (R / "profiles" / name).read_text()
        cpu = float(text.split("Self CPU time total: ")[1].split("ms")[0])
        gpu = float(text.split("Self CUDA time total: ")[1].split("ms")[0])
        lines.append(f"| {label} | {gpu / 3:.1f} | {cpu / 3:.1f} | profiles/{name} |")
    lines += ["", "EDoRA keeps the GPU busy for less time than LoRA (25 vs 37 ms per step eager; no weight gradients "
              "for A and B). At batch 2x512 the step is bound by launching kernels from Python, not by running them: "
              "the per-layer op launched ~20 small kernels per adapted layer (B R, the norm, m / n, casts), 56 layers "
              "here, 224 in a 32-layer model. The fast path computes those per-step parameter terms for all layers "
              "at once (a handful of batched kernels per shape group) and leaves 3 kernels forward and 6 backward "
              "per layer, fewer than a LoRA layer's; that took the eager step from 71-91 ms to 51-53 ms. Compiled, "
              "EDoRA's GPU time is below LoRA's (18.4 vs 25.7 ms per step)."]
    (R / "step_time.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (base, mode) in zip(axes, [("bf16", "eager"), ("nf4", "eager"), ("bf16", "compile")]):
        sel = [r for r in shipped if r["base"] == base and r["mode"] == mode and r.get("step_ms")]
        names = [r["variant"] for r in sel]
        vals = [r["step_ms"] for r in sel]
        colors = ["#999999" if n == "floor" else "#d62728" if n == "edora" else "#f4a582" if n.startswith("edora")
                  else "#1f77b4" for n in names]
        ax.bar(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_title(f"{base} base, {mode}")
        ax.set_ylabel("ms / train step (lower is better)")
        ax.tick_params(axis="x", labelrotation=30)
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
             "`python -m pipeline train` on the Mistral recipes (per-device batch 2, max length 512, bf16, gradient "
             "checkpointing, r = 64, all seven projections) on GSM8K-format rows, with gradient accumulation cut to 4 "
             "so a step takes seconds; step time and tokens/s over the steps after the first.", ""]
    for s in d["sets"]:
        lines += [f"## {s['note']}", "", f"Machine: {s['machine']}. Code {s['code']}. "
                  f"{s['settings']['steps']} steps, accumulation {s['settings']['accum']}, "
                  f"{s['settings']['nproc']} process(es).", "",
                  "| run | step s | tokens/s | peak GPU GiB (per GPU) | trainable | losses |", "|---|---|---|---|---|---|"]
        for r in s["runs"]:
            lines.append(f"| {r['run']} | {r.get('step_s')} | {r.get('tokens_per_s')} | {r.get('peak_gpu_gib')} | "
                         f"{r.get('trainable_params')} | {r.get('losses')} |")
        lines += ["", "Commands (OUT: the output folder):", ""] + [f"- `{r['command']}`" for r in s["runs"]] + [""]
    lines += ["Notes: tokens/s counts non-padding tokens of all processes. Micro-batches of 2 GSM8K rows "
              "(~220 tokens each) leave a 7B step far from GPU-bound, so these runs show that each configuration "
              "trains, its memory and the per-step cost of the stack rather than EDoRA's kernel speed "
              "(step_time.md). EDoRA's init (randomized SVD of 224 layers) took 3.0 s on one H100 and 3.4 s / 2.1 s "
              "with the SVDs split over 2 ZeRO-3 ranks (112 each); before 3536c16 a bf16 model was still on the "
              "CPU during init (~37 s under cProfile)."]
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
