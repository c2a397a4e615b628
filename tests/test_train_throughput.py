"""benchmarks/train_throughput.py: its FLOP count against torch's own FLOP counter; the whole grid on a tiny CPU
model through `pipeline train` (slow)."""

import json
import sys

import pytest
import torch
from helpers import tiny_tokenizer
from tests_paths import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import flops  # noqa: E402


def test_flop_count_matches_torch_flop_counter():
    """torch.utils.flop_counter counts every matmul (and attention at full s x s, causal or not) of a forward and
    a backward of a frozen Mistral-shaped model whose input embeddings need gradients (what training the adapters
    computes), with eager attention. flops.py's model FLOPs with the attention term taken at full s^2 must equal it exactly."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=120, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"  # plain matmuls: the counter sees them (not CPU sdpa's kernel)
    model.requires_grad_(False)
    s, rows = 10, 2
    ids = torch.randint(0, 120, (rows, s))
    emb = model.get_input_embeddings()(ids).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=emb).logits.float().sum().backward()
    sh = flops.shape(cfg)
    layers_n, head_n = flops.matmul_params(sh)
    assert layers_n == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96) and head_n == 64 * 120
    full_attention = 3 * 4 * sh["q"] * sh["L"] * s * s * rows  # forward 4 d L s^2 per row, backward twice that
    counted = flops.micro_batch_flops(sh, [s] * rows, 0)
    causal_attention = 3 * 2 * sh["q"] * sh["L"] * s * (s + 1) * rows
    assert counted["model"] - causal_attention + full_attention == counter.get_total_flops()
    # recompute of every layer = one more forward of the layers (no LM head)
    again = flops.micro_batch_flops(sh, [s] * rows, 3)
    assert again["hardware"] - counted["hardware"] == 2 * layers_n * s * rows + 2 * sh["q"] * sh["L"] * s * (s + 1) * rows


def test_mistral_7b_per_token_count_is_the_issues_43_gflop():
    """Issue 15 counted ~43 GFLOP per token for the 7B recipe (forward, input-gradient backward, recompute)."""
    from transformers import MistralConfig

    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000)
    f = flops.per_token(flops.shape(cfg), 300, 32)
    assert 42e9 < f["hardware"] < 44e9 and 28e9 < f["model"] < 29.5e9


@pytest.mark.slow
def test_tiny_grid_through_pipeline_train(tmp_path):
    """Three methods x (plain, padding-free) on a tiny model on the CPU through `pipeline train`: every field the GPU
    report needs is there, and padding-free trains the same rows to the same losses without padding."""
    import train_throughput

    tiny_tokenizer(tmp_path / "tok")
    result = train_throughput.main(["--tokenizer", str(tmp_path / "tok"), "--tiny", "--sets", "plain,padding_free",
                                    "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "out/train_throughput.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert (tmp_path / "out/train_throughput.md").exists() and (tmp_path / "out/train_throughput.png").exists()
    assert "FLOPs" in saved["flops_formula"] and saved["code"] and saved["machine"]["torch"]
    runs = {(r["set"], r["method"]): r for r in saved["runs"]}
    assert len(runs) == 6 and all(r["status"] == "ok" for r in runs.values()), runs
    for method in ("edora", "lora", "dora"):
        plain, flat = runs["plain", method], runs["padding_free", method]
        for r in (plain, flat):
            assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["model_gflop_per_token"] > 0
            assert set(r["split_ms_per_step"]) >= {"between_steps", "prep", "forward", "backward", "optimizer"}
            assert r["split_ms_per_step"]["forward"] > 0 and r["split_ms_per_step"]["backward"] > 0
            assert len(r["losses"]) == 3 and r["trainable_params"] > 0
        assert plain["padding_fraction"] > 0 and flat["padding_fraction"] == 0
        assert plain["tokens_per_step"] == flat["tokens_per_step"]  # the same rows
        assert plain["losses"] == pytest.approx(flat["losses"], abs=2e-4)
    assert runs["plain", "edora"]["trainable_params"] < runs["plain", "lora"]["trainable_params"]
