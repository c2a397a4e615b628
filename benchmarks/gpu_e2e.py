"""GPU host, end to end through the real CLI with vLLM: `pipeline run` (train on GPU, merge, eval with offline vLLM),
then `pipeline serve` (vllm serve) in the background and `pipeline eval --backend openai` against it; the two eval
backends must produce the same greedy completions.

    python benchmarks/gpu_e2e.py --data GSM8K_TRAIN.jsonl --test GSM8K_TEST.jsonl --out DIR

The model is a small random Llama (head_dim 64, which vLLM's attention kernels support) with a byte-level BPE
tokenizer trained here: no downloads. Writes DIR/gpu_e2e.json.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from helpers import tiny_llama, tiny_tokenizer

    model_dir = out / "model"
    tiny_llama(seed=0, vocab=300, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2,
               max_positions=4096).save_pretrained(
        model_dir)
    tiny_tokenizer(model_dir)
    recipe = yaml.safe_load((ROOT / "recipes/smollm2-135m/edora-gsm8k-cpu.yaml").read_text())
    recipe.update(name="gpu-e2e", output_dir=str(out / "runs"))
    recipe["model"].update(name_or_path=str(model_dir), dtype="bfloat16")
    recipe["data"].update(source=str(Path(args.data).resolve()), split="train[:256]", max_length=512)
    recipe["training"].update(max_steps=10, bf16=True)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    result = {}
    test = str(Path(args.test).resolve())

    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe_path), "--backend", "vllm",
                           "--tasks", "gsm8k", "--limit", str(args.limit), "--max-tokens", "64",
                           "--data-file", f"gsm8k={test}"], cwd=ROOT, env=env, capture_output=True, text=True)
    result["run"] = {"returncode": proc.returncode, "wall_s": round(time.time() - t, 1)}
    (out / "run.log").write_text(proc.stdout[-20000:] + proc.stderr[-40000:])
    run_dir = out / "runs" / "gpu-e2e"
    if proc.returncode != 0:
        result["run"]["error_tail"] = proc.stderr[-2000:]
        (out / "gpu_e2e.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 1
    result["merge_verification"] = json.loads((run_dir / "merged/merge_report.json").read_text())["verification"]
    result["vllm_summary"] = json.loads((run_dir / "eval/summary.json").read_text())

    port = 8765
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--model", str(run_dir / "merged"),
                               "--port", str(port), "--max-model-len", "2048", "--gpu-memory-utilization", "0.5"],
                              cwd=ROOT, env=env, stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        t = time.time()
        while time.time() - t < 300 and server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(2)
        result["serve_start_s"] = round(time.time() - t, 1)
        if server.poll() is not None:
            result["serve_error"] = (out / "serve.log").read_text()[-2000:]
            raise RuntimeError("pipeline serve exited before it was ready")
        proc = subprocess.run([sys.executable, "-m", "pipeline", "eval", "--backend", "openai", "--base-url",
                               f"http://127.0.0.1:{port}/v1", "--model", str(run_dir / "merged"), "--tasks", "gsm8k",
                               "--limit", str(args.limit), "--max-tokens", "64", "--data-file", f"gsm8k={test}",
                               "--out", str(out / "eval_http")], cwd=ROOT, env=env, capture_output=True, text=True)
        result["http_eval"] = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:]}
    except RuntimeError:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
    if (out / "eval_http/samples.jsonl").exists():
        def completions(path):
            return {json.loads(line)["id"]: json.loads(line)["completion"] for line in open(path)}
        offline = completions(run_dir / "eval/samples.jsonl")
        http = completions(out / "eval_http/samples.jsonl")
        same = sum(offline[k] == http.get(k) for k in offline)
        result["offline_vs_http_identical_completions"] = f"{same}/{len(offline)}"
    (out / "gpu_e2e.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "vllm_summary"}, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
