"""GPU host: train a Mistral-7B-shaped model (random weights, 32 layers) for a few steps through the real CLI with
the Mistral recipes' settings, and report step time, tokens/s and peak GPU memory.

    python benchmarks/train_7b_shape.py --tokenizer DIR --data GSM8K_TRAIN.jsonl --out DIR [--runs bf16,zero3,nf4]

The checkpoint uses the given tokenizer's vocabulary (the host has no hub access: SmolLM2's 49,152 tokens instead
of Mistral's 32,000; everything else is Mistral-7B's shape). Gradient accumulation is cut to --accum so a step
takes seconds; per-device batch as in the recipes (16; --batch N overrides), max length 512, bf16, gradient
checkpointing, r = 64.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "bf16": ("recipes/mistral-7b/edora-metamathqa.yaml", None, 1),
    "zero3": ("recipes/mistral-7b/edora-metamathqa.yaml", "recipes/accelerate/zero3.yaml", None),
    "nf4": ("recipes/mistral-7b/qedora-metamathqa.yaml", None, 1),
    "zero3-nf4": ("recipes/mistral-7b/qedora-metamathqa.yaml", "recipes/accelerate/zero3-4bit.yaml", None),
    "lora-bf16": ("recipes/mistral-7b/lora-metamathqa.yaml", None, 1),  # PEFT LoRA r=64, same settings
    "dora-bf16": ("recipes/mistral-7b/dora-metamathqa.yaml", None, 1),  # PEFT DoRA r=64
}


def build_checkpoint(path: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    if (path / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=32768,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def overrides(run_name: str, ckpt: Path, data: Path, out: Path, steps: int, accum: int, nproc: int,
              batch: int | None = None) -> list[str]:
    """The recipe overrides of a benchmark run: local checkpoint and GSM8K rows, few steps, no saving."""
    args = [f"--name={run_name}", f"--output_dir={out / 'runs'}", f"--model.name_or_path={ckpt}",
            f"--data.source={data}", "--data.format=gsm8k", "--data.split=train[:2000]",
            f"--training.max_steps={steps}", f"--training.gradient_accumulation_steps={accum}",
            "--training.report_to=none", "--training.save_steps=1000", "--training.logging_steps=1",
            f"--launcher.num_processes={nproc}"]
    return args + ([f"--training.per_device_train_batch_size={batch}"] if batch else [])


def run(name: str, ckpt: Path, data: Path, out: Path, steps: int, accum: int, nproc: int,
        cprofile: bool = False, batch: int | None = None) -> dict:
    recipe, accel, _ = RUNS[name]
    overrides_ = overrides(f"m7b-{name}", ckpt, data, out, steps, accum, nproc if accel else 1, batch)
    if accel:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accel, "--num_processes",
               str(nproc), "-m", "pipeline", "train", recipe, *overrides_]
    elif cprofile:  # host-side hot spots of the whole run, for pstats
        cmd = [sys.executable, "-m", "cProfile", "-o", str(out / f"{name}.prof"), "-m", "pipeline", "train", recipe,
               *overrides_]
    else:
        cmd = [sys.executable, "-m", "pipeline", "train", recipe, *overrides_]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    row = {"run": name, "command": " ".join(cmd), "wall_s": round(time.time() - t, 1), "returncode": proc.returncode}
    (out / f"{name}.log").write_text(proc.stdout[-20000:] + proc.stderr[-60000:])
    metrics = out / "runs" / f"m7b-{name}" / "metrics.jsonl"
    if proc.returncode == 0 and metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        train_rows = [r for r in rows if "loss" in r]
        times = [r["time"] for r in train_rows]
        toks = [r["tokens_seen"] for r in train_rows]
        if len(times) > 1:  # steps after the first (which includes warm-up)
            row["step_s"] = round((times[-1] - times[0]) / (len(times) - 1), 2)
            row["tokens_per_s"] = round((toks[-1] - toks[0]) / (times[-1] - times[0]))
        row["peak_gpu_gib"] = max(r.get("peak_gpu_gib", 0) for r in train_rows)
        row["losses"] = [round(r["loss"], 4) for r in train_rows]
        row["trainable_params"] = next((line.split("trainable parameters: ")[1].split(" of")[0]
                                        for line in proc.stderr.splitlines() if "trainable parameters:" in line), None)
    else:
        row["error_tail"] = proc.stderr[-1500:]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="/tmp/m7b")
    ap.add_argument("--runs", default="bf16,zero3,nf4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--batch", type=int, help="per-device batch (default: the recipe's)")
    ap.add_argument("--cprofile", action="store_true", help="run the non-launcher runs under cProfile (OUT/NAME.prof)")
    ap.add_argument("--code", default="", help="the commit measured (recorded in the JSON)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    build_checkpoint(Path(args.ckpt), Path(args.tokenizer))
    import torch

    result = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "checkpoint_build_s": round(time.time() - t, 1), "settings": vars(args), "code": args.code,
              "runs": []}
    for name in args.runs.split(","):
        row = run(name, Path(args.ckpt), Path(args.data).resolve(), out, args.steps, args.accum, args.nproc,
                  args.cprofile, args.batch)
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
        result["runs"].append(row)
        (out / "train_7b_shape.json").write_text(json.dumps(result, indent=1))
    os.environ.pop("PYTHONWARNINGS", None)


if __name__ == "__main__":
    main()
