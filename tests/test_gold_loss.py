"""The gold-solution loss: teacher-forced NLL of the completion tokens (+ EOS), checked against transformers' own
shifted cross-entropy with the prompt masked out."""

import math

import torch
from helpers import tiny_llama, tiny_tokenizer

from eval.gold_loss import completion_nll, gold_loss
from eval.tasks import Sample
from pipeline.data import to_prompt_completion


def test_completion_nll_equals_transformers_masked_loss():
    model, tok = tiny_llama(seed=1, vocab=300), tiny_tokenizer()
    pair = to_prompt_completion("Natalia sold 48 clips in April. How many?", "48/2 = 24.\nThe answer is: 72")
    nll, n = completion_nll(model, tok, pair["prompt"], pair["completion"])
    n_prompt = len(tok(pair["prompt"])["input_ids"])
    ids = tok(pair["prompt"] + pair["completion"])["input_ids"] + [tok.eos_token_id]
    labels = [-100] * n_prompt + ids[n_prompt:]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert n == len(ids) - n_prompt  # completion tokens and EOS
    assert math.isclose(nll / n, ref, rel_tol=1e-5)


def test_gold_loss_is_token_weighted_and_skips_samples_without_a_solution():
    model, tok = tiny_llama(seed=2, vocab=300), tiny_tokenizer()
    samples = [Sample("0", "What is 2+2?", 4, solution="2+2=4.\nThe answer is: 4"),
               Sample("1", "Half of 10?", 5, solution="10/2 = 5.\nThe answer is: 5"),
               Sample("2", "No solution here", 1)]
    parts = [completion_nll(model, tok, **to_prompt_completion(s.question, s.solution)) for s in samples[:2]]
    out = gold_loss(model, tok, samples)
    assert out["n"] == 2 and out["tokens"] == parts[0][1] + parts[1][1]
    assert math.isclose(out["loss"], (parts[0][0] + parts[1][0]) / out["tokens"], rel_tol=1e-9)
    assert math.isclose(out["perplexity"], math.exp(out["loss"]), rel_tol=1e-9)
    assert gold_loss(model, tok, samples[2:]) is None
