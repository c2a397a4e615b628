"""Teacher-forced loss of the gold solutions: how likely the model finds the reference answers.

Each eval problem becomes the prompt/completion pair training would make of it (pipeline.data), and the loss is the
mean negative log-likelihood per completion token (nats), EOS included: the quantity training minimises. Cheap (one
forward pass per problem, no generation) and it moves even when a small model's accuracy cannot.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def completion_nll(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """(sum of -log p over the completion's tokens and EOS, their count) for one pair, teacher-forced."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion)["input_ids"]
    if tokenizer.eos_token_id is not None:
        full_ids = full_ids + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] != prompt_ids:  # the completion merged into the prompt's last token: count from the fork
        n_prompt = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b)
    device = next(model.parameters()).device
    ids = torch.tensor([full_ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    scored = logp[n_prompt - 1:]  # position i predicts token i + 1: the first completion token is n_prompt
    return float(-scored.sum()), int(scored.numel())


def gold_loss(model, tokenizer, samples, desc: str = "gold-solution loss") -> dict | None:
    """Mean NLL per token over the samples that carry a gold solution; None when none does."""
    from tqdm import tqdm

    from pipeline.data import to_prompt_completion

    pairs = [to_prompt_completion(s.question, s.solution) for s in samples if s.solution]
    if not pairs:
        return None
    total, tokens = 0.0, 0
    for pair in tqdm(pairs, desc=desc, disable=len(pairs) < 10):
        nll, n = completion_nll(model, tokenizer, pair["prompt"], pair["completion"])
        total, tokens = total + nll, tokens + n
    mean = total / tokens
    return {"n": len(pairs), "tokens": tokens, "loss": mean, "perplexity": math.exp(mean)}


def gold_losses(out_dir: Path, model_spec: str, tasks: list, samples: dict, backend) -> dict:
    """Gold-solution loss per task, kept in gold_loss.json (recomputed only for other problems or another model)."""
    from eval.gold_loss import gold_loss

    path = out_dir / "gold_loss.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    out, model, tokenizer = {}, None, None
    for task in tasks:
        ids = [s.id for s in samples[task.name]]
        hit = cache.get(task.name)
        if hit and hit.get("model") == model_spec and hit.get("ids") == ids:
            out[task.name] = hit["result"]
            continue
        if model is None:
            if backend is not None and hasattr(backend, "model"):  # the hf backend: reuse the loaded model
                model, tokenizer = backend.model, backend.tokenizer
            else:
                import torch

                from pipeline.modeling import load_model, load_tokenizer

                device = "cuda" if torch.cuda.is_available() else "cpu"
                tokenizer = load_tokenizer(model_spec)
                model = load_model(model_spec, "bfloat16" if device == "cuda" else "float32").to(device).eval()
        result = gold_loss(model, tokenizer, samples[task.name], desc=f"{task.name} gold-solution loss")
        cache[task.name] = {"model": model_spec, "ids": ids, "result": result}
        path.write_text(json.dumps(cache) + "\n")
        out[task.name] = result
        if result:
            logger.info("%s: gold-solution loss %.4f nats/token over %d problems", task.name, result["loss"],
                        result["n"])
    return out
