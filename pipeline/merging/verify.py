"""Check a merged checkpoint against the adapter it came from: same prompts, logits and greedy tokens compared.

Models run one after the other (each reference, then the merged model), each freed before the next loads, so peak
memory stays about one model.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from pipeline.dtypes import lower_precision

logger = logging.getLogger(__name__)

PROMPTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nNatalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\n\n### Response: Let's think step by step.",
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. The answer is:",
    "The capital of France is",
    "def fibonacci(n):\n    ",
]
NEW_TOKENS = 16
RANDOM_PROMPT_LEN = 24


def prompt_ids(model_dir: Path, vocab_size: int) -> tuple[list[torch.Tensor], str]:
    """Token ids of the fixed prompts (random but seeded ids when the checkpoint has no tokenizer)."""
    from .adapter import has_tokenizer

    if has_tokenizer(model_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return [tok(p, return_tensors="pt").input_ids for p in PROMPTS], "text"
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, RANDOM_PROMPT_LEN), generator=gen) for _ in PROMPTS], "random ids"


@torch.no_grad()
def run(model, ids: list[torch.Tensor]) -> dict:
    model.eval()
    dev = next(model.parameters()).device
    logits, greedy = [], []
    for x in ids:
        x = x.to(dev)
        logits.append(model(x).logits[0].float().cpu())
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        greedy.append(out[0, x.shape[1]:].cpu().tolist())
    return {"logits": logits, "greedy": greedy}


def compare(ref: dict, got: dict) -> dict:
    diffs = [(a - b).abs() for a, b in zip(ref["logits"], got["logits"])]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref["logits"], got["logits"]))
    total = sum(a.shape[0] for a in ref["logits"])
    scale = max(a.abs().max().item() for a in ref["logits"])
    worst = max(d.max().item() for d in diffs)
    return {"max_abs_logit_diff": worst, "rel_logit_diff": worst / max(scale, 1e-30),
            "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
            "max_abs_logit": scale,
            "argmax_agreement": agree / total,
            "greedy_sequences_equal": sum(a == b for a, b in zip(ref["greedy"], got["greedy"])),
            "greedy_sequences": len(ref["greedy"]),
            "greedy_token_agreement": sum(x == y for a, b in zip(ref["greedy"], got["greedy"]) for x, y in zip(a, b))
            / max(1, sum(len(a) for a in ref["greedy"]))}


def free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def verify(merged_dir: Path, references: dict, load_merged, vocab_size: int) -> dict:
    """references: label -> (description, loader); each loader returns a model. Returns the comparisons."""
    ids, kind = prompt_ids(merged_dir, vocab_size)
    runs, seconds = {}, {}
    for label, (desc, loader) in references.items():
        t0 = time.perf_counter()
        logger.info("verify: running the reference '%s' (%s)", label, desc)
        model = loader()
        runs[label] = run(model, ids)
        free(model)
        seconds[label] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logger.info("verify: running the merged model")
    model = load_merged()
    merged = run(model, ids)
    free(model)
    seconds["merged"] = time.perf_counter() - t0
    result = {"prompts": len(ids), "prompt_kind": kind, "prompt_tokens": [int(x.shape[1]) for x in ids],
              "new_tokens": NEW_TOKENS, "seconds": seconds, "comparisons": {}}
    for label, (desc, _) in references.items():
        result["comparisons"][label] = {"reference": desc, **compare(runs[label], merged)}
    return result


def disable_bnb_cpu_repacking(model) -> None:
    # bnb 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel on first use; the project keeps adapted layers
    # out of that (pipeline/edora/layer.py), and the reference here keeps every layer on the plain dequant path.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


# Max |logit difference| (merged vs adapter model) / max |logit| of the adapter model, per output dtype, and the least
# share of positions whose argmax must agree. Relative, because the difference scales with the logits (SmolLM2's
# reach 35, a tiny random model's 0.7). Worst measured (module docstring): fp32 4.0e-6, bf16 4.4e-2, fp16 6.2e-3;
# the limits leave 3-25x margin. In 16 bits the difference is the rounding of the merged weights vs the adapter
# path's own rounding, so it grows with depth; a wrong merge moves logits by far more.
TOLERANCES = {"float32": 1e-4, "bfloat16": 0.15, "float16": 0.03}
MIN_AGREEMENT = {"float32": 0.99, "bfloat16": 0.9, "float16": 0.95}


def verify_merge(tmp: Path, adapter, load_spec: str, dtype_name: str, into: str, device: str) -> dict:
    """Run the adapter model(s) and the merged model in `tmp` on the fixed prompts; the comparison that gates
    the merge is checked against TOLERANCES / MIN_AGREEMENT of the output dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.edora.loader import load_edora_adapter
    from pipeline.modeling import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def full_ref():
        return load_edora_adapter(load_model(load_spec, dtype=dtype_name, device_map=device), adapter.dir)

    def quant_ref():
        q = adapter.quant
        base = load_model(load_spec, dtype=q.base_dtype, quantization_config=q.bnb_config(), device_map=device)
        disable_bnb_cpu_repacking(base)
        return load_edora_adapter(base, adapter.dir)

    def merged():
        return AutoModelForCausalLM.from_pretrained(str(tmp), dtype=getattr(torch, dtype_name), device_map=device)

    if adapter.quant is None:
        refs = {"adapter": (f"base ({dtype_name}) + adapter", full_ref)}
        gate = "adapter"
    else:
        q = adapter.quant
        refs = {"adapter_4bit_base": (f"{q.quant_type} 4-bit base (as trained, compute {q.compute_dtype}) + adapter",
                                      quant_ref),
                "adapter_full_base": (f"full-precision base ({dtype_name}) + adapter", full_ref)}
        gate = "adapter_4bit_base" if into == "dequantized" else "adapter_full_base"
    vocab = AutoConfig.from_pretrained(str(tmp)).vocab_size
    result = verify(tmp, refs, merged, vocab)
    tol_dtype = dtype_name
    if gate == "adapter_4bit_base":  # the 4-bit reference may compute in a lower precision than the output
        tol_dtype = lower_precision(adapter.quant.compute_dtype, dtype_name)
    result.update(device=device, gate=gate, tolerance=TOLERANCES[tol_dtype], tolerance_dtype=tol_dtype,
                  min_agreement=MIN_AGREEMENT[tol_dtype])
    g = result["comparisons"][gate]
    result["passed"] = g["rel_logit_diff"] <= TOLERANCES[tol_dtype] and g["argmax_agreement"] >= MIN_AGREEMENT[tol_dtype]
    return result
