"""Peak memory and wall time of `python -m pipeline merge` on a Mistral-7B-shaped checkpoint (CPU, no GPU).

    python benchmarks/merge_memory.py                 # 32 layers: ~14.5 GB base + ~14.5 GB merged on disk
    python benchmarks/merge_memory.py --layers 8      # a shorter model where disk is short (results extrapolated)

Builds a random bf16 checkpoint with Mistral-7B's shapes (hidden 4096, intermediate 14336, 32 heads / 8 kv heads,
vocab 32000) shard by shard (never all in memory), and a random EDoRA adapter for it (r = 64, all 7 projections,
row norms consistent with the base so the fingerprint check passes), then runs the merge CLI in a subprocess with
`--no-verify` (running a 7B model twice on a 2-core CPU would take far longer than the merge) and polls its memory
every 0.1 s from /proc: RSS, split into anonymous memory (what the process really allocates) and file-backed pages
(mapped safetensors pages; page cache the kernel can drop). Writes benchmarks/results/merge_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mistral_shapes(layers: int, hidden=4096, inter=14336, heads=32, kv=8, vocab=32000) -> list[tuple[str, tuple]]:
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (heads * hd, hidden)), (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
                (p + "self_attn.v_proj.weight", (kv * hd, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def build(work: Path, layers: int, r: int = 64) -> tuple[Path, Path]:
    """The random base checkpoint (5 GB shards, written tensor by tensor) and a random EDoRA adapter for it."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import MistralConfig

    from pipeline.edora import EdoraConfig
    from pipeline.merging.st_io import Entry, ShardWriter, natural_key, plan_shards, shard_names, write_index

    base, adapter = work / "base", work / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, dtype="bfloat16").save_pretrained(base)
    entries = [Entry(n, torch.bfloat16, s) for n, s in sorted(mistral_shapes(layers), key=lambda t: natural_key(t[0]))]
    shards = plan_shards(entries, 5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    ad = {}
    for shard, fname in zip(shards, shard_names(len(shards))):
        w = ShardWriter(base / fname, shard)
        for e in tqdm(shard, desc=f"building {fname}", unit="tensor"):
            if len(e.shape) == 1:
                t = torch.ones(e.shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(e.shape, generator=gen) * 0.02).to(torch.bfloat16)
            if e.name.rsplit(".", 2)[-2] in PROJ:
                out_f, in_f = e.shape
                key = "base_model.model." + e.name[: -len(".weight")]
                w2 = t.float().pow(2).sum(dim=1)
                ad[key + ".edora_row_norm2"] = w2
                ad[key + ".edora_magnitude"] = w2.sqrt() * (1 + 0.01 * torch.randn(out_f, generator=gen))
                ad[key + ".edora_A"] = torch.randn(r, in_f, generator=gen) * 0.02
                ad[key + ".edora_B"] = torch.randn(out_f, r, generator=gen) / out_f**0.5
                ad[key + ".edora_R"] = torch.randn(r, r, generator=gen) * 0.05
            w.write(e.name, t)
            del t
        w.close()
    write_index(base, shards)
    save_file(ad, adapter / "adapter_model.safetensors")
    EdoraConfig(r=r, target_modules=PROJ, base_model_name_or_path=str(base)).save_pretrained(adapter)
    return base, adapter


def proc_mem(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                fields[k] = int(v.split()[0]) * 1024
    return fields


def measure(cmd: list[str]) -> dict:
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    samples = []
    while proc.poll() is None:
        total = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        try:
            for p in [ps, *ps.children(recursive=True)]:
                for k, v in proc_mem(p.pid).items():
                    total[k] += v
        except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
            pass
        samples.append((time.perf_counter() - t0, total["VmRSS"], total["RssAnon"], total["RssFile"]))
        time.sleep(0.1)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({proc.returncode}):\n{out[-3000:]}")
    g = 2**30
    return {"wall_s": wall, "peak_rss_gib": max(s[1] for s in samples) / g,
            "peak_rss_anon_gib": max(s[2] for s in samples) / g, "peak_rss_file_gib": max(s[3] for s in samples) / g,
            "ru_maxrss_children_gib": maxrss / g, "samples": [(round(t, 2), round(a / g, 3), round(b / g, 3),
                                                               round(c / g, 3)) for t, a, b, c in samples]}


def machine() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the built and merged checkpoints")
    args = ap.parse_args()
    need = 2 * 14.5e9 * (args.layers + 2) / 34
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if free < need * 1.1:
        raise SystemExit(f"{work} has {free / 1e9:.0f} GB free; {need / 1e9:.0f} GB needed. Use --layers 8.")
    try:
        t0 = time.perf_counter()
        base, adapter = build(work, args.layers)
        build_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "pipeline", "merge", "--adapter", str(adapter), "--out", str(work / "merged"),
               "--dtype", "bfloat16", "--no-verify"]
        res = measure(cmd)
        report = json.loads((work / "merged" / "merge_report.json").read_text())
        size = sum(p.stat().st_size for p in (work / "merged").glob("*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    samples = res.pop("samples")
    result = {"command": f"python benchmarks/merge_memory.py --layers {args.layers}",
              "merge_command": "python -m pipeline merge --adapter <adapter> --out <merged> --dtype bfloat16 "
                               "--no-verify",
              "machine": machine(), "layers": args.layers, "rank": 64, "modules_per_layer": 7,
              "checkpoint_gb": size / 1e9, "build_s": build_s, **res,
              "merge_report_peak_rss_gib": report["peak_rss_gib"], "merge_report_timing_s": report["timing_s"],
              "verification": "skipped (--no-verify)"}
    if args.layers != 32:
        result["extrapolated_32_layers_wall_s"] = res["wall_s"] * 34 / (args.layers + 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_memory.json").write_text(json.dumps({**result, "samples_t_rss_anon_file_gib": samples},
                                                          indent=1) + "\n")
    write_md(result)
    plot(samples, result)
    print(json.dumps(result, indent=2))


def write_md(r: dict) -> None:
    m = r["machine"]
    lines = [
        "# Merge memory: Mistral-7B-shaped checkpoint, EDoRA r = 64 on all 7 projections",
        "",
        f"Command: `{r['command']}` (runs `{r['merge_command']}` in a subprocess).",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, no GPU; torch {m['torch']}.",
        f"Verification: {r['verification']}.",
        "",
        "| layers | output | wall s | peak RSS GiB (polled) | anonymous | file-backed (mapped shards) | ru_maxrss GiB |",
        "|---|---|---|---|---|---|---|",
        f"| {r['layers']} | {r['checkpoint_gb']:.1f} GB bf16 | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} | "
        f"{r['peak_rss_anon_gib']:.2f} | {r['peak_rss_file_gib']:.2f} | {r['ru_maxrss_children_gib']:.2f} |",
        "",
        "RSS is polled every 0.1 s from /proc (process and children). Anonymous memory is what the merge allocates "
        "(one fp32 weight and its work copies); file-backed pages are the mapped safetensors tensor being read, which "
        "the kernel can drop under pressure. ru_maxrss (the kernel's own peak for the child) also catches peaks shorter than "
        "the polling interval.",
    ]
    if "extrapolated_32_layers_wall_s" in r:
        lines.append(f"\nExtrapolated to 32 layers (wall time scales with the number of tensors; peak memory does "
                     f"not): ~{r['extrapolated_32_layers_wall_s']:.0f} s.")
    (RESULTS / "merge_memory.md").write_text("\n".join(lines) + "\n")


def plot(samples, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.stackplot(t, [s[2] for s in samples], [s[3] for s in samples], labels=["anonymous", "file-backed"],
                 alpha=0.8)
    ax.plot(t, [s[1] for s in samples], color="black", lw=0.8, label="RSS")
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    m = r["machine"]
    ax.set_title(f"merge of a {r['layers']}-layer Mistral-7B-shaped bf16 checkpoint (EDoRA r=64)\n"
                 f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; peak RSS {r['peak_rss_gib']:.2f} GiB, "
                 f"{r['wall_s']:.0f} s", fontsize=9)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(RESULTS / "merge_memory.png", dpi=120)


if __name__ == "__main__":
    main()
