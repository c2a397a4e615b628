"""benchmarks/train_scaling.py: the --nproc 2 path on the CPU (gloo, ZeRO-3, a tiny model) through `pipeline train`
under `accelerate launch`, its per-rank records and the merge check (slow); the efficiency arithmetic (fast)."""

import json
import sys

import pytest
from helpers import tiny_tokenizer
from tests_paths import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_scaling_efficiency_is_per_gpu_tokens_over_n1():
    import train_scaling

    rows = [{"status": "ok", "base": "bf16", "method": "edora", "nproc": 1, "tokens_per_s": 1000,
             "tokens_per_s_per_gpu": 1000},
            {"status": "ok", "base": "bf16", "method": "edora", "nproc": 4, "tokens_per_s": 3600,
             "tokens_per_s_per_gpu": 900},
            {"status": "ok", "base": "bf16", "method": "lora", "nproc": 2, "tokens_per_s": 1800,
             "tokens_per_s_per_gpu": 900}]
    train_scaling.efficiencies(rows)
    assert rows[1]["scaling_efficiency"] == 0.9 and rows[1]["speedup"] == 3.6
    assert rows[0]["scaling_efficiency"] == 1.0
    assert "scaling_efficiency" not in rows[2]  # no LoRA run at N = 1 to compare with


def test_bad_nproc_is_a_clear_error(capsys):
    import train_scaling

    with pytest.raises(SystemExit):
        train_scaling.parse_args(["--tokenizer", "x", "--nproc", "two"])
    assert "comma-separated list of integers" in capsys.readouterr().err


@pytest.mark.slow  # one 2-process launch (~25 s) and a merge (~25 s)
def test_two_ranks_on_cpu_record_each_rank_and_the_merge_matches_the_sharded_model(tmp_path):
    import train_scaling

    tiny_tokenizer(tmp_path / "tok")
    result = train_scaling.main(["--tokenizer", str(tmp_path / "tok"), "--tiny", "--nproc", "2", "--methods", "edora",
                                 "--bases", "bf16,nf4", "--check-merge", "--port", "29547",
                                 "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    saved = json.loads((tmp_path / "out/train_scaling.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert (tmp_path / "out/train_scaling.md").exists() and (tmp_path / "out/train_scaling.png").exists()
    assert saved["code"] and saved["machine"]["torch"] and "--nproc 2" in saved["command"]
    run, nf4 = saved["runs"]
    assert nf4["status"] == "skipped" and "CUDA" in nf4["error"]
    assert any("CUDA" in n for n in saved["notes"])
    assert run["status"] == "ok", run.get("error")
    assert "--num_processes 2" in run["command"] and "zero3-cpu.yaml" in run["command"]
    assert [r["rank"] for r in run["ranks"]] == [0, 1] and all(r["world"] == 2 for r in run["ranks"])
    # 2 layers x 7 projections = 14 SVDs, split round-robin: 7 per rank; each rank gathers all 14 weights
    assert run["init"]["svd_calls_per_rank"] == [7, 7] and run["init"]["layers"] == 14
    assert all(r["init"]["broadcasts"] == 14 for r in run["ranks"])
    assert all(s > 0 for s in run["init"]["svd_s_per_rank"]) and run["init"]["inject_s"] > 0
    for r in run["ranks"]:
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3  # 1 warm-up + 2 measured steps, on every rank
    assert run["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in run["ranks"]), abs=1)
    assert run["tokens_per_s_per_gpu"] == pytest.approx(run["tokens_per_s"] / 2, abs=1)
    assert "scaling_efficiency" not in run  # no N = 1 run
    (check,) = saved["merge_checks"]
    assert check["nproc"] == 2 and check["dtype"] == "float32" and check["merge_verification"]["passed"] is True
    assert check["rel_logit_diff"] <= 1e-4 and check["argmax_agreement"] == 1.0 and check["passed"] is True
    assert check["max_abs_logit"] > 0 and check["prompt_shape"] == [2, 16]
