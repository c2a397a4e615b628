"""Train-step time, tokens/s and peak GPU memory of EDoRA vs PEFT LoRA / DoRA on Mistral-7B-shaped decoder stacks.

Every variant runs in one process on the same random weights and inputs: a MistralForCausalLM with N layers
(hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 32000), bf16 or an NF4 4-bit base, adapters on all
seven projections, one step = forward + backward + AdamW step on the adapter, no gradient checkpointing.

    python benchmarks/step_time.py --out benchmarks/results/step_time.json [--grid eager|compile|4bit|all]

Results are appended to the JSON as they come (a crash keeps finished rows); `benchmarks/report.py` makes the
Markdown table and the PNG from it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers: the NF4 swap shared with tests

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(layers: int, quant: bool, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # init_weights' std 0.02 everywhere; enough for timing
        for p in model.parameters():
            p.normal_(0, 0.02)
    if quant:
        from helpers import quantize_linears_nf4

        quantize_linears_nf4(model, TARGETS)
        torch.cuda.empty_cache()
    model.requires_grad_(False)
    return model


def add_adapter(model, variant: str, r: int):
    from peft import LoraConfig, get_peft_model

    from pipeline.edora import EdoraConfig

    if variant == "floor":
        model.enable_input_require_grads()  # the backward still computes input gradients through every layer
        return model
    if variant in ("lora", "dora"):
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, use_dora=variant == "dora")
    elif variant in ("edora", "edora-perlayer", "edora-nofuse", "loraxs"):
        cfg = EdoraConfig(r=r, target_modules=TARGETS, use_magnitude=variant != "loraxs")
    else:
        raise ValueError(variant)
    model = get_peft_model(model, cfg)
    if variant == "edora-perlayer":  # the per-layer fused op only (the code before the batched step terms)
        model.base_model.batch_step_terms = False
    return model


class _NoBaseFusion:
    """For the 'edora-nofuse' variant: batched step terms, but the base matmul in its own node (as on a 4-bit base)."""

    def __enter__(self):
        from pipeline.edora.layer import Linear

        self.orig = Linear.__dict__["_plain_base"]
        Linear._plain_base = staticmethod(lambda *a: False)

    def __exit__(self, *exc):
        from pipeline.edora.layer import Linear

        Linear._plain_base = self.orig


def measure(variant: str, r: int, layers: int, batch: int, seq: int, quant: bool, compile_: bool,
            warmup: int = 3, steps: int = 10) -> dict:
    row = dict(variant=variant, r=r, layers=layers, batch=batch, seq=seq, base="nf4" if quant else "bf16",
               mode="compile" if compile_ else "eager")
    if compile_:
        from torch._dynamo.utils import counters

        counters.clear()
    model = None
    gc.collect()
    row["allocated_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)  # > 0: an earlier variant leaked
    nofuse = _NoBaseFusion() if variant == "edora-nofuse" else contextlib.nullcontext()
    try:
        nofuse.__enter__()
        t_build = time.perf_counter()
        model = build_model(layers, quant)
        torch.cuda.synchronize()
        row["build_s"] = round(time.perf_counter() - t_build, 1)
        t_build = time.perf_counter()
        model = add_adapter(model, variant, r)
        torch.cuda.synchronize()
        row["adapter_s"] = round(time.perf_counter() - t_build, 1)  # EDoRA: the SVD init
        params = [p for p in model.parameters() if p.requires_grad]
        row["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        fwd = torch.compile(model) if compile_ else model
        g = torch.Generator(device="cuda").manual_seed(1)
        ids = torch.randint(0, 32000, (batch, seq), device="cuda", generator=g)

        def step():
            out = fwd(input_ids=ids, labels=ids)
            out.loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        t_first = time.perf_counter()
        step()
        torch.cuda.synchronize()
        row["first_step_s"] = round(time.perf_counter() - t_first, 2)  # includes compilation
        for _ in range(warmup - 1):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        row.update(step_ms=round(ms, 2), tokens_per_s=round(batch * seq / ms * 1000),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if compile_:  # what dynamo made of it: a recompile or graph break per step would show here
            from torch._dynamo.utils import counters

            row["dynamo"] = dict(graphs=counters["stats"]["unique_graphs"],
                                 graph_breaks=sum(counters["graph_break"].values()),
                                 frames=counters["frames"]["total"])
            host = []
            for _ in range(3):  # host time of one step (no sync inside): > step_ms means launch-bound
                torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                host.append(round((time.perf_counter() - t) * 1000, 1))
            row["host_ms"] = host
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # a variant that fails (e.g. does not compile) is recorded, the rest still run
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        nofuse.__exit__(None, None, None)
        if model is not None:  # drop this step's EDoRA terms explicitly so the next variant starts from zero
            for mod in model.modules():
                mod.__dict__.pop("_edora_step", None)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def profile(variant: str, seq: int, layers: int = 8, batch: int = 2, r: int = 64, compile_: bool = False,
            host: bool = False) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = add_adapter(build_model(layers, False), variant, r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")

    fwd = torch.compile(model) if compile_ else model

    def step():
        fwd(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if host:  # where the Python side of a launch-bound step goes
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
        text = f"== {variant}{' (compiled)' if compile_ else ''}: host time (cProfile) over 10 steps ==\n" + buf.getvalue()
        print(text)
        return text
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    text = (f"== {variant}{' (compiled)' if compile_ else ''}: top CUDA kernels over 3 steps ==\n"
            + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    print(text)
    return text


def interleaved(specs: list, seq: int, rounds: int, steps: int = 5) -> list:
    """Eager steps are launch-bound at this size, so their time follows the host's speed, which drifts between
    machines and within a run (eager LoRA measured 47 to 75 ms). All variants are built first (same base weights,
    same inputs) and timed in turns, `rounds` times; each row reports the median round and all rounds."""
    models, rows = [], []
    g = torch.Generator(device="cuda").manual_seed(1)
    for spec in specs:
        assert not spec["compile_"], "interleaved timing is for eager rows"
        model = add_adapter(build_model(spec["layers"], spec["quant"]), spec["variant"], spec["r"])
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        ids = torch.randint(0, 32000, (spec["batch"], seq), device="cuda", generator=g)
        models.append((model, opt, ids))
        rows.append(dict(variant=spec["variant"], r=spec["r"], layers=spec["layers"], batch=spec["batch"], seq=seq,
                         base="nf4" if spec["quant"] else "bf16", mode="eager", timing=f"interleaved x{rounds}",
                         trainable_params=sum(p.numel() for p in params), round_ms=[]))

    def run(i: int, n: int) -> None:
        model, opt, ids = models[i]
        with _NoBaseFusion() if specs[i]["variant"] == "edora-nofuse" else contextlib.nullcontext():
            for _ in range(n):
                model(input_ids=ids, labels=ids).loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)

    for i in range(len(specs)):
        run(i, 3)  # warm-up
    torch.cuda.synchronize()
    for _ in range(rounds):
        for i, row in enumerate(rows):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(i, steps)
            end.record()
            torch.cuda.synchronize()
            row["round_ms"].append(round(start.elapsed_time(end) / steps, 2))
    for row in rows:
        ms = sorted(row["round_ms"])[len(row["round_ms"]) // 2]
        row.update(step_ms=ms, tokens_per_s=round(row["batch"] * seq / ms * 1000))
    return rows


def grid(name: str):
    v4 = ["floor", "lora", "dora", "edora"]
    v5 = v4 + ["edora-perlayer"]
    if name == "eager":
        for layers in (8, 32):
            for batch in (2, 8):
                for r in (16, 64):
                    for v in v4:
                        if v == "floor" and r == 16:
                            continue
                        yield dict(variant=v, r=r, layers=layers, batch=batch, quant=False, compile_=False)
    elif name == "compile":
        for v in ["floor", "lora", "edora", "dora"]:
            yield dict(variant=v, r=64, layers=8, batch=2, quant=False, compile_=True)
    elif name == "compile3":
        for v in ["floor", "lora", "edora"]:
            yield dict(variant=v, r=64, layers=8, batch=2, quant=False, compile_=True)
    elif name == "compile-grid":  # the eager grid's other shapes, compiled (~1-3 min of compilation per row)
        for layers in (8, 32):
            for batch in (2, 8):
                for r in (16, 64):
                    if (layers, batch, r) != (8, 2, 64):
                        for v in ["lora", "edora"]:
                            yield dict(variant=v, r=r, layers=layers, batch=batch, quant=False, compile_=True)
    elif name == "compile-edora":  # alone in a fresh process: nothing compiled before it
        yield dict(variant="edora", r=64, layers=8, batch=2, quant=False, compile_=True)
    elif name == "4bit":
        for v in v5:
            yield dict(variant=v, r=64, layers=8, batch=2, quant=True, compile_=False)
    elif name in ("4bit-grid", "4bit-32"):
        shapes = [(8, 2, 16), (8, 8, 64), (32, 2, 64)] if name == "4bit-grid" else [(32, 2, 64)]
        for layers, batch, r in shapes:
            for v in v4:
                yield dict(variant=v, r=r, layers=layers, batch=batch, quant=True, compile_=False)
    elif name == "target":  # the configuration the targets are stated for
        for v in v5 + ["edora-nofuse"]:
            yield dict(variant=v, r=64, layers=8, batch=2, quant=False, compile_=False)
    else:
        raise ValueError(name)


def environment() -> dict:
    import peft
    import transformers

    return dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, peft=peft.__version__, python=platform.python_version())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/step_time.json")
    ap.add_argument("--grid", default="target", help="target | eager | compile | compile3 | compile-grid | 4bit | "
                    "4bit-grid | 4bit-32 | compile-edora, comma-separated")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new rows after this many seconds")
    ap.add_argument("--profile", default=None, help="print the top CUDA kernels of these variants (comma-separated; "
                    "r=64, 8 layers)")
    ap.add_argument("--profile-compiled", action="store_true", help="profile the torch.compile'd model")
    ap.add_argument("--profile-host", action="store_true", help="profile the host side (cProfile) instead")
    ap.add_argument("--code", default="", help="the commit measured (recorded in each row)")
    ap.add_argument("--interleave", type=int, default=0, help="eager grids: build all variants, then time them in "
                    "turns this many rounds (median reported); no memory figures")
    ap.add_argument("--profile-out", default=None, help="write the profile table to this file")
    args = ap.parse_args()
    if args.profile:
        for variant in args.profile.split(","):
            text = profile(variant, args.seq, compile_=args.profile_compiled, host=args.profile_host)
            if args.profile_out:
                mode = ("compiled" if args.profile_compiled else "eager") + ("_host" if args.profile_host else "")
                path = Path(args.profile_out) / f"{variant}_{mode}_{args.code or 'local'}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            gc.collect()
            torch.cuda.empty_cache()
        return
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    data.setdefault("environment", environment())
    data.setdefault("commands", []).append(" ".join(sys.argv))
    t0 = time.time()
    command = " ".join(["python", "benchmarks/step_time.py"] + sys.argv[1:])
    if args.interleave:
        for name in args.grid.split(","):
            for row in interleaved(list(grid(name)), args.seq, args.interleave):
                row.update(grid=name, code=args.code, command=command)
                print(json.dumps(row), flush=True)
                data["runs"].append(row)
            out.write_text(json.dumps(data, indent=1))
        return
    for name in args.grid.split(","):
        for spec in grid(name):
            if time.time() - t0 > args.budget_s:
                print("time budget reached; stopping", flush=True)
                break
            row = measure(seq=args.seq, **spec)
            row.update(grid=name, code=args.code, command=" ".join(["python", "benchmarks/step_time.py"] + sys.argv[1:]))
            print(json.dumps(row), flush=True)
            data["runs"].append(row)
            out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
