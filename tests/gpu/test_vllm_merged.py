"""GPU host only: a briefly trained EDoRA adapter, merged by `python -m pipeline merge`, loads in vLLM and its greedy
completions equal transformers' greedy `generate` on the merged checkpoint. Builds its own tiny model + tokenizer.

    pytest -m gpu tests/gpu/test_vllm_merged.py
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers)

pytestmark = pytest.mark.gpu

PROMPTS = ["Natalia sold 48/2 = 24 clips in May.", "### Instruction: ### Response: Let's think step by step.",
           "The answer is:", "0123456789 +-*/="]
NEW = 16
TIE_MARGIN = 0.1  # bf16 kernels may pick either of two tokens closer than this; compare only up to such a step


def _train(model, tok, steps, params, lr):
    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction: ### Response: Let's think step by step. The answer is: 42",
        "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. 0123456789 +-*/=$%.,",
    ]
    batch = tok(corpus, return_tensors="pt", padding=True).to(model.device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    from helpers import ALL_LINEAR, tiny_llama, tiny_tokenizer
    from peft import get_peft_model

    from pipeline.cli import main as cli
    from pipeline.edora import EdoraConfig

    root = tmp_path_factory.mktemp("vllm")
    tok = tiny_tokenizer(root / "base", vocab_size=300)
    # head_dim 64 (hidden 256 / 4 heads): a size every vLLM attention backend supports
    base = tiny_llama(seed=0, vocab=300, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2).cuda()
    # "pretrain" so greedy predictions are confident rather than near-ties of a random model
    _train(base, tok, 150, base.parameters(), 3e-3)
    base.cpu().save_pretrained(root / "base")
    model = get_peft_model(base.cuda(), EdoraConfig(r=8, target_modules=ALL_LINEAR, seed=0, init_sigma=1e-3))
    _train(model, tok, 30, [p for p in model.parameters() if p.requires_grad], 1e-2)
    model.save_pretrained(root / "run" / "adapter")
    assert cli(["merge", "--adapter", str(root / "run" / "adapter"), "--base", str(root / "base"),
                "--dtype", "bfloat16"]) == 0
    out = root / "run" / "merged"
    assert json.loads((out / "merge_report.json").read_text())["verification"]["passed"]
    return out


def test_vllm_greedy_equals_transformers_greedy(merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(merged_dir)
    hf = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).cuda().eval()
    expected, margins = [], []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids.cuda()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        expected.append((ids[0].tolist(), out.sequences[0, ids.shape[1]:].tolist()))
        top2 = [s[0].float().topk(2).values for s in out.scores]
        margins.append([float(t[0] - t[1]) for t in top2])
    del hf
    torch.cuda.empty_cache()

    llm = LLM(model=str(merged_dir), dtype="bfloat16", enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.3, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": ids} for ids, _ in expected], params)
    compared = 0
    for (ids, want), res, margin in zip(expected, got, margins):
        have = list(res.outputs[0].token_ids)
        # compare up to (not including) the first step where transformers' top two are a near-tie
        n = next((i for i, m in enumerate(margin) if m < TIE_MARGIN), NEW)
        assert have[:n] == want[:n], f"prompt {tok.decode(ids)!r}: vLLM {have} vs transformers {want}"
        compared += n
    assert compared >= NEW * len(PROMPTS) // 2, f"only {compared} tokens compared: outputs are mostly near-ties"
