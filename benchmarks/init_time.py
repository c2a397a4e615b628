"""EDoRA initialisation time of a Mistral-7B-shaped model (32 layers, 7 projections, r=64) and the approximation
error the randomized SVD accepts, on one GPU.

    python benchmarks/init_time.py --out benchmarks/results/init_time.json [--exact-layers 4]

The exact SVD of all 32 layers takes minutes; --exact-layers times it on the first N layers and scales linearly.
Error: for sampled layers, ||W - B A||_F^2 of the randomized factors over the optimal (exact) tail energy.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_time import TARGETS, build_model, environment  # noqa: E402


def init_seconds(layers: int, method: str) -> tuple[float, object]:
    from peft import get_peft_model

    from pipeline.edora import EdoraConfig

    model = build_model(layers, quant=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model = get_peft_model(model, EdoraConfig(r=64, target_modules=TARGETS, svd_method=method))
    torch.cuda.synchronize()
    return time.perf_counter() - t, model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/init_time.json")
    ap.add_argument("--exact-layers", type=int, default=2)
    args = ap.parse_args()
    res = {"environment": environment(), "command": " ".join(sys.argv), "r": 64}
    secs, model = init_seconds(32, "randomized")
    res["randomized_32_layers_s"] = round(secs, 2)
    print(res, flush=True)
    from pipeline.edora import Linear

    errors = []
    layers = [m for n, m in model.named_modules() if isinstance(m, Linear)]
    seen = set()
    for layer in layers:  # one sample of each matrix shape
        if (layer.out_features, layer.in_features) in seen:
            continue
        seen.add((layer.out_features, layer.in_features))
        w = layer.get_base_layer().weight.float()
        ba = layer.edora_B["default"] @ layer.edora_A["default"]
        sv = torch.linalg.svdvals(w)
        got = torch.linalg.matrix_norm(w - ba).item() ** 2
        best = (sv[64:] ** 2).sum().item()
        errors.append({"shape": list(w.shape), "residual_over_optimal": round(got / best, 6),
                       "captured_energy": round(1 - got / (sv ** 2).sum().item(), 6),
                       "optimal_captured_energy": round(1 - best / (sv ** 2).sum().item(), 6)})
        print(errors[-1], flush=True)
    res["randomized_error_random_weights"] = errors
    del model
    torch.cuda.empty_cache()
    secs, model = init_seconds(args.exact_layers, "exact")
    res["exact_layers_timed"] = args.exact_layers
    res["exact_s_timed"] = round(secs, 2)
    res["exact_32_layers_s_extrapolated"] = round(secs * 32 / args.exact_layers, 1)
    print(res, flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
