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
