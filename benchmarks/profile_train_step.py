"""Profile optimizer steps of a real `pipeline train` run (torch.profiler), to see where a CLI step's time goes.

    python benchmarks/profile_train_step.py --model /tmp/m7b --data GSM8K_TRAIN.jsonl --out DIR [--runs bf16,lora-bf16]

Each run is `python -m pipeline train` on a recipe of benchmarks/train_7b_shape.py (same overrides), in its own
process, with a trainer callback that profiles optimizer steps --skip+1 .. --skip+--steps (every micro-batch,
forward, backward and the optimizer step). Per run it writes DIR/<run>_profile.txt (kernels by GPU time, ops by
host time) and DIR/profile_train_step.json: wall ms per step (synchronised at both ends), summed GPU kernel ms,
kernel and operator counts per step. GPU kernel ms well below the wall means the step waits on the host.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from child import emit, run_child  # noqa: E402


def profiled_run(args) -> None:
    """In this process: `pipeline train` with a profiling callback; prints RESULT <json>."""
    import torch
    from train_7b_shape import RUNS, overrides
    from transformers import TrainerCallback

    import pipeline.trainer as trainer_mod
    from pipeline.cli import main as cli_main

    cuda = torch.cuda.is_available()
    result: dict = {"run": args.one}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.skip and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                sync()
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None and state.global_step == args.skip + args.steps:
                sync()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                summarize(self.prof, wall, args, result)
                self.prof = None

    timeline = result.setdefault("timeline", []) if args.timeline else None
    gc_ms, gc_t0 = [0.0], [0.0]  # GC pauses, summed (--timeline)

    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_ms[0] += 1000 * (time.perf_counter() - gc_t0[0])

    make = trainer_mod.make_trainer

    def make_trainer(*a, **kw):
        trainer = make(*a, **kw)
        if timeline is None:
            trainer.add_callback(Profile())
            return trainer
        # --timeline: every micro-batch's synchronised wall time and shape, and the GC pauses in between
        step = trainer.training_step

        def training_step(model, inputs, *rest, **kws):
            sync()
            gc0 = gc_ms[0]
            t = time.perf_counter()
            out = step(model, inputs, *rest, **kws)
            sync()
            timeline.append({"step": trainer.state.global_step, "shape": list(inputs["input_ids"].shape),
                             "ms": round(1000 * (time.perf_counter() - t), 1), "gc_ms": round(gc_ms[0] - gc0, 1)})
            return out

        trainer.training_step = training_step
        return trainer

    if timeline is not None:
        gc.callbacks.append(on_gc)
    trainer_mod.make_trainer = make_trainer
    recipe = RUNS[args.one][0]
    args_ = overrides(f"prof-{args.one}", Path(args.model), Path(args.data), Path(args.out), args.skip + args.steps,
                      args.accum, 1, args.batch)
    result["returncode"] = cli_main(["train", recipe, *args_])
    result["command"] = " ".join(["python -m pipeline train", recipe, *args_])
    emit(result)


def summarize(prof, wall: float, args, result: dict) -> None:
    from torch.autograd import DeviceType

    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    n = args.steps
    result.update({"steps": n, "accum": args.accum, "wall_ms_per_step": 1000 * wall / n,
                   "gpu_kernel_ms_per_step": sum(e.time_range.elapsed_us() for e in gpu) / 1000 / n,
                   "kernels_per_step": len(gpu) / n, "aten_ops_per_step": len(ops) / n})
    table = prof.key_averages()
    text = [f"{args.one}: {n} optimizer steps x {args.accum} micro-batches; wall {result['wall_ms_per_step']:.1f} ms "
            f"per step, GPU kernels {result['gpu_kernel_ms_per_step']:.1f} ms, {result['kernels_per_step']:.0f} "
            f"kernels, {result['aten_ops_per_step']:.0f} aten ops per step", "",
            table.table(sort_by="self_device_time_total", row_limit=35, max_name_column_width=70), "",
            table.table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=70)]
    (Path(args.out) / f"{args.one}_profile.txt").write_text("\n".join(text) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint dir (train_7b_shape.build_checkpoint makes one)")
    p.add_argument("--data", required=True, help="GSM8K train JSONL")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--runs", default="bf16,lora-bf16", help="names from train_7b_shape.RUNS (single-process ones)")
    p.add_argument("--skip", type=int, default=3, help="optimizer steps before the profiled ones")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps profiled")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation (micro-batches per step)")
    p.add_argument("--batch", type=int, help="per-device batch (default: the recipe's)")
    p.add_argument("--timeline", action="store_true",
                   help="no profiler: time every micro-batch (synchronised) with its shape and GC pauses")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        profiled_run(args)
        return 0
    rows = []
    for name in args.runs.split(","):
        r = run_child(__file__, sys.argv[1:], name)
        if r is None:
            continue
        rows.append(r)
        if args.timeline:
            ms = [t["ms"] for t in r["timeline"]]
            print(f"{name}: micro-batches {len(ms)}, median {sorted(ms)[len(ms) // 2]:.0f} ms, max {max(ms):.0f} ms, "
                  f"GC {sum(t['gc_ms'] for t in r['timeline']):.0f} ms in all")
            continue
        print(f"{name}: wall {r.get('wall_ms_per_step', float('nan')):.1f} ms/step, GPU kernels "
              f"{r.get('gpu_kernel_ms_per_step', float('nan')):.1f} ms, {r.get('kernels_per_step', 0):.0f} kernels, "
              f"{r.get('aten_ops_per_step', 0):.0f} aten ops")
    (args.out / "profile_train_step.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
