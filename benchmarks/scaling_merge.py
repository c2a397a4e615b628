"""train_scaling.py --check-merge: the adapter that rank 0 saved after a ZeRO-3 run merges with `pipeline merge`
(verification on), and the merged checkpoint's logits equal the sharded, trained model's on fixed prompts.

The sharded model's logits come from scaling_child.py (every rank in the forward, rank 0 saves them). Tolerances are
`pipeline merge`'s own verification gates (pipeline/merging/verify.py) for the merged dtype: the largest |logit
difference| over the largest |logit| of the sharded model (float32: 1e-4; bfloat16: 0.15) and the share of positions
whose argmax token agrees (float32: 0.99; bfloat16: 0.9). An NF4-trained adapter merges `--into dequantized` (the
base weights after the NF4 round trip that training saw), so its merged model reproduces the 4-bit model's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def check_merge(row: dict, tiny: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.merging.verify import MIN_AGREEMENT, TOLERANCES

    dtype = "float32" if tiny else "bfloat16"
    adapter = Path(row["run_dir"]) / "adapter"
    out = {"base": row["base"], "method": row["method"], "nproc": row["nproc"], "adapter": str(adapter),
           "dtype": dtype, "tolerance_rel": TOLERANCES[dtype], "min_argmax_agreement": MIN_AGREEMENT[dtype]}
    cmd = [sys.executable, "-m", "pipeline", "merge", "--adapter", str(adapter), "--dtype", dtype, "--overwrite"]
    if row["base"] == "nf4":
        cmd += ["--into", "dequantized"]
    out["command"] = " ".join(["python -m pipeline merge", *cmd[4:]])
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out["merge_s"] = round(time.time() - t, 1)
    merged = adapter.parent / "merged"
    if proc.returncode != 0:
        return out | {"passed": False, "error": f"pipeline merge exited {proc.returncode}: {proc.stderr[-1500:]}"}
    report = json.loads((merged / "merge_report.json").read_text())
    ver = report.get("verification") or {}
    out["merge_verification"] = {"passed": ver.get("passed"), "gate": ver.get("gate"),
                                 **{k: v for k, v in ((ver.get("comparisons") or {}).get(ver.get("gate")) or {}).items()
                                    if k in ("rel_logit_diff", "max_abs_logit_diff", "argmax_agreement")}}
    sharded = torch.load(Path(row["rank_dir"]) / "logits.pt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, dtype)).to(device).eval()
    with torch.no_grad():
        got = model(input_ids=sharded["ids"].to(device)).logits.float().cpu()
    ref = sharded["logits"]
    worst = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    out.update(max_abs_logit_diff=worst, max_abs_logit=scale, rel_logit_diff=worst / max(scale, 1e-30),
               argmax_agreement=agree, prompt_shape=list(sharded["ids"].shape))
    out["passed"] = bool(ver.get("passed") and out["rel_logit_diff"] <= TOLERANCES[dtype]
                         and agree >= MIN_AGREEMENT[dtype])
    return out
