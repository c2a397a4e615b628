"""Training through the real CLI: single process, resume after a kill, 2-process ZeRO-3 on CPU, 4-bit base."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer, write_recipe
from tests_paths import ROOT

from pipeline.cli import main as cli_main
from pipeline.trainer import read_metrics


def test_cli_train_loss_falls_and_writes_the_run(tiny_setup, tmp_path, capfd, caplog):
    recipe = write_recipe(tiny_setup, "run", tmp_path, training={"max_steps": 12})
    with caplog.at_level("INFO", logger="pipeline.train"):
        assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "run"
    # one line per logged step: the project's (with tok/s and ETA), not also transformers' printed dict
    assert sum(" loss " in r.getMessage() and r.getMessage().startswith("step ") for r in caplog.records) == 12
    assert "{'loss'" not in capfd.readouterr().out
    card = (run / "README.md").read_text()  # TRL's model card names the real base, not "None"
    assert f"`{tiny_setup / 'model'}`" in card and "None" not in card
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    for name in ["recipe.yaml", "metrics.jsonl", "loss.png", "trainer_state.json", "data_stats.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/edora_meta.json",
                 "adapter/tokenizer_config.json"]:
        assert (run / name).exists(), name
    cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert cfg["peft_type"] == "EDORA" and cfg["base_model_name_or_path"] == str(tiny_setup / "model")
    assert "import pipeline.edora" in (run / "adapter/README.md").read_text()
    row = [r for r in read_metrics(run / "metrics.jsonl") if "tokens_per_second" in r][-1]
    assert row["tokens_per_second"] > 0 and "eta_seconds" in row
    # checkpoints hold the adapter and optimizer state, never the frozen base weights
    ckpt = run / "checkpoint-12"  # save_total_limit 2 keeps 8 and 12
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert not list(ckpt.glob("model*.safetensors"))
    # a second launch refuses to overwrite the finished run
    assert cli_main(["train", str(recipe)]) == 2


def test_completion_only_masking_token_by_token(tiny_setup, tmp_path):
    from trl import SFTConfig

    from pipeline.data import load_sft_dataset
    from pipeline.edora import EdoraConfig
    from pipeline.recipe import load_recipe
    from pipeline.trainer import make_trainer

    recipe = load_recipe(write_recipe(tiny_setup, "mask", tmp_path))
    tok = tiny_tokenizer()
    train_ds, _, _ = load_sft_dataset(recipe.data, recipe.seed)
    args = SFTConfig(**recipe.sft_config_kwargs(), use_cpu=True)
    model = tiny_llama(vocab=300)
    trainer = make_trainer(model, args, train_ds, None, tok, EdoraConfig(r=2, target_modules=["q_proj"]),
                           tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    for i in range(3):
        raw = train_ds[i]
        prompt_ids = tok(raw["prompt"]).input_ids
        full_ids = tok(raw["prompt"] + raw["completion"]).input_ids + [tok.eos_token_id]
        n = len(full_ids)
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        assert ids[:n].tolist() == full_ids
        assert (labels[: len(prompt_ids)] == -100).all()                      # no loss on the prompt
        assert labels[len(prompt_ids):n].tolist() == full_ids[len(prompt_ids):]  # loss on solution + EOS
        assert labels[n - 1] == tok.eos_token_id
        assert (labels[n:] == -100).all()                                      # nor on padding
    assert raw["completion"].rstrip().endswith("The answer is: " + str(3 + 2 + 7 + 4))


def test_resume_after_a_kill_reproduces_the_loss_curve(tiny_setup, tmp_path):
    full = write_recipe(tiny_setup, "full", tmp_path, training={"max_steps": 10, "save_steps": 3})
    assert cli_main(["train", str(full)]) == 0
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "runs/full/metrics.jsonl") if "loss" in r}

    killed = write_recipe(tiny_setup, "killed", tmp_path, training={"max_steps": 10, "save_steps": 3})
    run = tmp_path / "runs" / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoint-6" / "trainer_state.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # like a preempted job: no clean shutdown
    proc.wait()
    if (run / "adapter").exists():
        pytest.skip("the run finished before it could be killed")
    assert cli_main(["train", str(killed), "--resume"]) == 0
    resumed = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_setup, tmp_path, capsys):
    recipe = write_recipe(tiny_setup, "fresh", tmp_path)
    assert cli_main(["train", str(recipe), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow  # two launched processes, ~20 s
def test_zero3_two_processes_on_cpu_saves_an_adapter_that_reloads_equal(tiny_setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import pipeline.edora  # noqa: F401

    recipe = write_recipe(tiny_setup, "z3", tmp_path,
                          launcher={"accelerate_config": str(ROOT / "recipes/accelerate/zero3-cpu.yaml"),
                                    "num_processes": 2})
    dump = tmp_path / "rank0.pt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/zero3-cpu.yaml"), "--num_processes", "2", "--main_process_port", "29533",
           str(ROOT / "tests/scripts/train_and_dump_logits.py"), str(recipe), str(dump)]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    run = tmp_path / "runs" / "z3"
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 8
    ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoint-8").rglob("*") if f.is_file())
    model_bytes = sum(f.stat().st_size for f in (tiny_setup / "model").glob("*.safetensors"))
    assert ckpt_bytes < model_bytes  # no frozen base weights in checkpoints

    # each rank ran only its share of the SVDs and received the rest: identical factors everywhere
    ranks = [json.loads((tmp_path / f"rank0.pt.rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["layers"] == ranks[1]["layers"] == 14
    assert ranks[0]["svd_calls"] == ranks[1]["svd_calls"] == 7
    assert ranks[0]["checksum"] == ranks[1]["checksum"] > 0

    expected = torch.load(dump)
    base = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    model = PeftModel.from_pretrained(base, run / "adapter")
    with torch.no_grad():
        got = model(input_ids=expected["ids"]).logits
    torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-5)
    trained = {n: p for n, p in model.named_parameters() if "edora_R" in n}
    assert any(p.abs().max() > 1e-3 for p in trained.values())  # R moved well past its 1e-5 init

    # the adapter from the ZeRO-3 run merges into a plain checkpoint that reproduces rank 0's logits
    assert cli_main(["merge", "--adapter", str(run / "adapter"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=expected["ids"]).logits, expected["logits"], rtol=1e-5,
                                   atol=1e-5)
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["verification"]["passed"] is True


def test_4bit_base_trains_on_cpu(tiny_setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    recipe = write_recipe(tiny_setup, "q4", tmp_path, model={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                            "bnb_4bit_compute_dtype": "float32",
                                                            "bnb_4bit_quant_storage": "uint8"},
                          training={"max_steps": 4})
    assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "q4"
    from pipeline.adapter_meta import AdapterMeta

    meta = AdapterMeta.read(run / "adapter")
    assert meta.base_load_in_4bit is True and meta.bnb_4bit_quant_type == "nf4" and meta.quant().double_quant
    from safetensors.torch import load_file

    sd = load_file(run / "adapter/adapter_model.safetensors")
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.edora_magnitude"].dtype == torch.float32
    assert len([r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]) == 4


@pytest.mark.parametrize("quant", [False, True])
def test_the_trainer_runs_the_batched_fast_path_with_checkpointing(tiny_setup, tmp_path, monkeypatch, quant):
    """Under TRL's SFTTrainer with gradient checkpointing (the 7B recipes' setting) every micro-step takes the
    batched path (pipeline/edora/step_terms.py), on a plain and on a 4-bit base (there after the first, which learns
    the compute dtype of bitsandbytes' matmul)."""
    from pipeline.edora import ops

    calls = []
    orig = ops.EdoraStepTerms.forward
    monkeypatch.setattr(ops.EdoraStepTerms, "forward", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    model = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
             "bnb_4bit_quant_storage": "uint8"} if quant else {}
    if quant:
        pytest.importorskip("bitsandbytes")
    recipe = write_recipe(tiny_setup, "ckpt", tmp_path, model=model,
                          training={"max_steps": 3, "gradient_checkpointing": True,
                                    "gradient_accumulation_steps": 2})
    assert cli_main(["train", str(recipe)]) == 0
    # 3 steps x 2 micro-steps; 3 shape groups in the tiny Llama
    assert len(calls) == (5 if quant else 6) * 3


def test_batch_and_accumulation_split_gives_the_same_update(tiny_setup, tmp_path):
    """The 7B recipes reach their batch of 128 with few large micro-batches (16 x 8 on one GPU) instead of the
    published 2 x 64: the same rows, so the same step, because the loss is normalised over the whole accumulated
    batch. SGD (not AdamW, whose first step is ~lr * sign(g) and would hide a mis-scaled loss), fp32, one step."""
    from safetensors.torch import load_file

    adapters = {}
    for bs, accum in [(2, 4), (8, 1)]:
        name = f"b{bs}x{accum}"
        recipe = write_recipe(tiny_setup, name, tmp_path, model={"dtype": "float32"},
                              training={"max_steps": 1, "per_device_train_batch_size": bs,
                                        "gradient_accumulation_steps": accum, "optim": "sgd", "learning_rate": 5.0,
                                        "max_grad_norm": 0.0, "bf16": False, "save_steps": 100})
        assert cli_main(["train", str(recipe)]) == 0
        adapters[name] = load_file(tmp_path / "runs" / name / "adapter/adapter_model.safetensors")
    init = write_recipe(tiny_setup, "init", tmp_path, model={"dtype": "float32"},
                        training={"max_steps": 1, "learning_rate": 1e-30, "optim": "sgd", "bf16": False})
    assert cli_main(["train", str(init)]) == 0
    before = load_file(tmp_path / "runs/init/adapter/adapter_model.safetensors")  # the init: lr 1e-30 moves nothing
    a, b = adapters["b2x4"], adapters["b8x1"]
    moved = 0.0
    for k in a:
        if "edora_R" in k or "edora_magnitude" in k:
            d_a, d_b = a[k] - before[k], b[k] - before[k]
            moved = max(moved, d_a.abs().max().item())
            assert torch.allclose(d_a, d_b, rtol=1e-3, atol=1e-6 * d_a.abs().max().item()), k
    assert moved > 1e-4  # the step did move the adapter


@pytest.mark.slow
def test_magnitude_lr_ratio_scales_only_the_magnitude_step(tiny_setup, tmp_path):
    """adapter.magnitude_lr_ratio: with SGD (update = -lr x grad) one step moves m exactly `ratio` times as far as
    with the plain recipe, and R exactly as far."""
    from safetensors.torch import load_file

    init = write_recipe(tiny_setup, "init", tmp_path, model={"dtype": "float32"},
                        training={"max_steps": 1, "learning_rate": 1e-30, "optim": "sgd", "bf16": False})
    assert cli_main(["train", str(init)]) == 0
    before = load_file(tmp_path / "runs/init/adapter/adapter_model.safetensors")
    after = {}
    for ratio in (None, 10.0):
        name = f"ratio{ratio}"
        recipe = write_recipe(tiny_setup, name, tmp_path, model={"dtype": "float32"},
                              adapter={"magnitude_lr_ratio": ratio},
                              training={"max_steps": 1, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0,
                                        "bf16": False, "save_steps": 100})
        assert cli_main(["train", str(recipe)]) == 0
        after[ratio] = load_file(tmp_path / "runs" / name / "adapter/adapter_model.safetensors")
    n_mag = 0
    for k, v in before.items():
        d1, d10 = after[None][k] - v, after[10.0][k] - v
        if "edora_magnitude" in k:
            n_mag += 1
            assert d1.abs().max() > 1e-5 and torch.allclose(d10, 10 * d1, rtol=1e-3, atol=2e-6), k  # fp32 m + step
        elif "edora_R" in k:
            assert torch.allclose(d10, d1, rtol=1e-4, atol=1e-12), k
    assert n_mag > 0


def test_magnitude_lr_ratio_is_checked(tiny_setup, tmp_path):
    from pipeline.recipe import RecipeError, load_recipe

    for adapter, msg in [({"method": "lora", "magnitude_lr_ratio": 2.0}, "only applies to method edora"),
                         ({"magnitude_lr_ratio": 0.0}, "finite number > 0")]:
        recipe = write_recipe(tiny_setup, "bad", tmp_path, adapter=adapter)
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe)


FULL = {"method": "full", "init_sigma": None, "svd_method": None, "svd_niter": None, "svd_target": None}


@pytest.mark.slow
def test_full_finetune_trains_every_weight_into_a_plain_checkpoint(tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tiny_setup, "full", tmp_path, model={"dtype": "float32"}, adapter=FULL,
                          training={"max_steps": 2, "learning_rate": 1e-3, "bf16": False})
    assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "full"
    assert not (run / "adapter").exists() and (run / "merged" / "tokenizer_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    tuned = AutoModelForCausalLM.from_pretrained(run / "merged")
    moved = {n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b)}
    assert "model.embed_tokens.weight" in moved and "lm_head.weight" in moved
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.norm.weight" in moved
    assert cli_main(["train", str(recipe)]) == 2  # a second train into the same run is refused


def test_full_finetune_needs_fp32_weights(tiny_setup, tmp_path):
    from pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="full fine-tune keeps no fp32 master weights"):
        load_recipe(write_recipe(tiny_setup, "bad", tmp_path, model={"dtype": "bfloat16"}, adapter=FULL))
