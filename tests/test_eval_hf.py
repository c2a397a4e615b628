"""The transformers backend end to end with the real SmolLM2-135M (CPU, slow)."""

import json

import pytest
from helpers import GSM8K_ROWS, write_jsonl

from eval.backends import HFBackend, Sampling
from pipeline.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_hf_backend_cli_end_to_end(smollm2_dir, tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS)
    out = tmp_path / "o"
    assert cli_main(["eval", "--model", str(smollm2_dir), "--backend", "hf", "--tasks", "gsm8k", "--data-file",
                     f"gsm8k={data}", "--limit", "2", "--max-tokens", "12", "--batch-size", "2",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").open()]
    assert sorted(r["id"] for r in rows) == ["0", "1"]
    for r in rows:
        assert r["backend"] == "hf" and 0 <= r["generated_tokens"] <= 12
        assert not any(s in r["completion"] for s in ("Instruction", "Response"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["gsm8k"]["n"] == 2 and summary["generated_tokens"] == sum(r["generated_tokens"]
                                                                                        for r in rows)
    assert summary["sampling"]["gsm8k"]["max_tokens"] == 12 and summary["sampling"]["gsm8k"]["temperature"] == 0.0


def test_hf_backend_left_padding_matches_unbatched(smollm2_dir):
    """Greedy decoding of a short prompt padded into a batch equals decoding it alone."""
    backend = HFBackend(str(smollm2_dir), batch_size=2)
    prompts = ["The capital of France is", "Count with me: one, two, three, four, five, six, seven,"]
    sampling = Sampling(max_tokens=8, stop=("Instruction",))
    batched = dict((i, text) for i, text, _ in backend.generate(prompts, sampling))
    alone = next(iter(backend.generate(prompts[:1], sampling)))[1]
    assert batched[0] == alone and batched[1].strip()
