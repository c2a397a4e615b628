"""Generation throughput of the eval backends on the same GSM8K prompts (GPU host).

    # offline vLLM and transformers, each in its own process (vLLM takes most of the GPU memory):
    python benchmarks/eval_throughput.py --model runs/mistral-7b-edora/merged --backends vllm,hf --n 256 \
        --data-file ../shared/data/gsm8k/test.jsonl
    # the HTTP backend against a running `python -m pipeline serve` (start it first):
    python benchmarks/eval_throughput.py --model runs/mistral-7b-edora/merged --backends openai \
        --base-url http://127.0.0.1:8000/v1

A run too long for one sitting can be split with --start/--n; tokens/s of the whole is the summed tokens over the
summed generate seconds. Writes benchmarks/results/eval_throughput.json (one entry per backend: prompts, generated tokens, seconds, tokens/s,
GSM8K strict accuracy on those prompts, and how many completions equal the first backend's: greedy decoding should
agree almost everywhere, so a low number points at a prompt or sampling difference) and eval_throughput.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from child import emit, run_child  # noqa: E402


def run_one(args) -> dict:
    """Generate with one backend in this process; returns its measurements and completions."""
    from eval.backends import Sampling, make_backend
    from eval.tasks import TASKS, load_samples

    task = TASKS["gsm8k"]
    samples, source = load_samples(task, args.data_file)
    samples = samples[args.start:args.start + args.n]
    sampling = Sampling(max_tokens=args.max_tokens or task.max_tokens, stop=tuple(task.stop))
    t0 = time.time()
    backend = make_backend(args.one, args.model, batch_size=args.batch_size,
                           tensor_parallel_size=args.tensor_parallel_size, base_url=args.base_url, api_key=None)
    load_s = time.time() - t0
    completions, tokens = [""] * len(samples), 0
    t0 = time.time()
    for i, text, n in backend.generate([task.prompt(s) for s in samples], sampling):
        completions[i] = text
        tokens += n or 0
    gen_s = time.time() - t0
    strict = sum(task.score(s, c)["strict"] for s, c in zip(samples, completions)) / len(samples)
    return {"backend": args.one, "model": args.model, "first": args.start, "prompts": len(samples),
            "batch_size": args.batch_size, "data_sha256": source["sha256"],
            "sampling": sampling.to_dict(), "load_s": load_s, "generate_s": gen_s, "generated_tokens": tokens,
            "tokens_per_s": tokens / gen_s if gen_s else 0.0, "prompts_per_s": len(samples) / gen_s,
            "gsm8k_strict": strict, "completions": completions}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--backends", default="vllm,hf", help="comma-separated: vllm, openai, hf")
    p.add_argument("--n", type=int, default=256, help="GSM8K prompts")
    p.add_argument("--start", type=int, default=0,
                   help="skip the first START prompts (a long run split over calls: --start 0 --n 768, --start 768)")
    p.add_argument("--data-file", help="local GSM8K test JSONL (default: the hub)")
    p.add_argument("--max-tokens", type=int, help="default: the task's 1024")
    p.add_argument("--batch-size", type=int, help="hf batch / openai requests in flight")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results dir (default {RESULTS})")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one backend, print JSON
    args = p.parse_args()
    if args.one:
        emit(run_one(args))
        return 0

    results = []
    for backend in args.backends.split(","):
        r = run_child(__file__, sys.argv[1:], backend)
        if r is None:
            continue
        results.append(r)
        print(f"{backend}: {r['tokens_per_s']:.0f} tok/s, {r['prompts_per_s']:.2f} prompts/s, "
              f"load {r['load_s']:.0f} s, GSM8K strict {100 * r['gsm8k_strict']:.1f}% on {r['prompts']}")
    if not results:
        return 1
    reference = results[0]["completions"]
    for r in results:
        r["same_as_" + results[0]["backend"]] = sum(a == b for a, b in zip(r.pop("completions"), reference))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_throughput.json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar([r["backend"] for r in results], [r["tokens_per_s"] for r in results])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"GSM8K, {results[0]['prompts']} prompts, greedy", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "eval_throughput.png", dpi=120)
    print(f"wrote {args.out / 'eval_throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
