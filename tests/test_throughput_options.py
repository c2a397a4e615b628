"""The recipe's throughput options (issue 15): padding-free batches learn what padded ones do; the options reach
TRL's SFTConfig; bad settings are clear errors."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_llama, tiny_tokenizer
from tests_paths import ROOT

from pipeline.recipe import RecipeError, build_peft_config, recipe_from_dict


def rows_of_varied_length(n=16):
    """GSM8K-like rows whose lengths differ by tens of tokens, so that a padded batch holds real padding."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        rows.append({"question": f"Tom has {a} apples" + " and more" * (i % 5) + f" and buys {b}. How many?",
                     "answer": f"Tom has {a} + {b} = {a + b} apples." + " So" * (3 * (i % 4)) + f"\n#### {a + b}"})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pf")
    tiny_llama(seed=0, vocab=300).save_pretrained(root / "model")
    tiny_tokenizer(root / "model")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of_varied_length()))
    return root


def recipe_dict(root: Path, name: str, out: Path, **training) -> dict:
    d = yaml.safe_load((ROOT / "recipes/smollm2-135m/edora-gsm8k-cpu.yaml").read_text())
    d.update(name=name, output_dir=str(out))
    d["model"].update(name_or_path=str(root / "model"), dtype="float32", attn_implementation="sdpa")
    d["adapter"]["r"] = 4
    d["data"].update(source=str(root / "rows.jsonl"), split="train", max_length=256)
    d["training"].update(per_device_train_batch_size=6, bf16=False, max_steps=1, **training)
    return d


def build_trainer(root: Path, out: Path, padding_free: bool):
    """The trainer `pipeline train` builds (recipe -> SFTConfig -> make_trainer), without training."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from pipeline.data import load_sft_dataset
    from pipeline.trainer import make_trainer

    recipe = recipe_from_dict(recipe_dict(root, f"pf-{padding_free}", out, padding_free=padding_free))
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32, attn_implementation="sdpa")
    train_ds, _, _ = load_sft_dataset(recipe.data, recipe.seed)
    args = SFTConfig(**recipe.sft_config_kwargs(), use_cpu=True)
    return make_trainer(model, args, train_ds, None, tiny_tokenizer(), build_peft_config(recipe.adapter), out,
                        padding_free=recipe.training.padding_free)


def rows_of(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of each example in a collated batch: padded rows cut at their mask, a padding-free row
    split where its position ids restart."""
    if "attention_mask" in batch:
        keep = batch["attention_mask"].bool()
        return [(ids[m], lab[m]) for ids, lab, m in zip(batch["input_ids"], batch["labels"], keep)]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    return [(batch["input_ids"][0, a:b], batch["labels"][0, a:b]) for a, b in zip(starts[:-1], starts[1:])]


def trainable_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_padding_free_batch_has_the_padded_loss_and_gradients(tiny, tmp_path):
    """A padding-free micro-batch (one flattened row, position ids restarting per example) gives the loss and the
    adapter gradients of the padded batch of the same rows, and both equal an independent formula: each example
    run alone, next-token NLL summed over its completion tokens, divided by the completion tokens of the batch."""
    torch.manual_seed(0)
    results = {}
    for padding_free in (False, True):
        trainer = build_trainer(tiny, tmp_path, padding_free)
        batch = next(iter(trainer.get_train_dataloader()))
        model = trainer.model
        model.train()
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        loss.backward()
        results[padding_free] = (batch, loss.item(), trainable_grads(model), model)

    padded, flat = results[False][0], results[True][0]
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    rows = rows_of(padded)
    lengths = [len(ids) for ids, _ in rows]
    assert len(set(lengths)) > 1 and padded["input_ids"].numel() > sum(lengths)  # the padded batch has padding
    assert flat["input_ids"].shape[1] == sum(lengths)  # ... the flat one has none
    for (ids_p, lab_p), (ids_f, lab_f) in zip(rows, rows_of(flat), strict=True):  # the same examples
        assert torch.equal(ids_p, ids_f)
        assert torch.equal(lab_p[1:], lab_f[1:])  # the first label is never a target (no token before it)

    # independent: every example alone through the same (padded-run) model, no padding, no position ids given
    model = results[False][3]
    nll, targets = 0.0, 0
    for ids, labels in rows:
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        tgt = labels[1:]
        m = tgt != -100
        nll = nll + torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum")
        targets += int(m.sum())
    expected = nll / targets
    expected.backward()
    want = trainable_grads(model)
    assert targets > 0 and sum(int((lab[1:] == -100).sum()) for _, lab in rows) > 0  # prompts are masked out

    for padding_free in (False, True):
        _, loss, grads, _ = results[padding_free]
        assert loss == pytest.approx(expected.item(), rel=1e-5), padding_free
        assert grads.keys() == want.keys()
        for name, g in grads.items():
            scale = want[name].abs().max().item()
            assert scale > 0, name
            assert torch.allclose(g, want[name], rtol=1e-4, atol=1e-5 * scale), (padding_free, name)


def test_throughput_options_reach_sft_config(tiny, tmp_path):
    """Defaults are the plain recipe (nothing changes for existing recipes); each option lands in SFTConfig."""
    plain = recipe_from_dict(recipe_dict(tiny, "plain", tmp_path)).sft_config_kwargs()
    assert plain["activation_checkpointing_kwargs"] is None
    assert plain["use_liger_kernel"] is False and plain["torch_compile"] is False and plain["packing"] is False
    fast = recipe_from_dict(recipe_dict(tiny, "fast", tmp_path, gradient_checkpointing=True,
                                        checkpoint_every_n_layers=2, torch_compile=True)).sft_config_kwargs()
    assert fast["activation_checkpointing_kwargs"] == {"every_n_layers": 2}
    assert fast["activation_checkpointing"] is True and fast["torch_compile"] is True


def test_throughput_options_are_checked(tiny, tmp_path):
    def problems(**training):
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(recipe_dict(tiny, "bad", tmp_path, **training))
        return str(e.value)

    assert "training.checkpoint_every_n_layers: 0 must be >= 1" in problems(checkpoint_every_n_layers=0)
    text = problems(checkpoint_every_n_layers=2, gradient_checkpointing=False)
    assert "only applies with gradient_checkpointing: true" in text


def test_liger_kernel_needs_its_package(tiny, tmp_path):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") and importlib.util.find_spec("triton"):
        pytest.skip("liger-kernel and triton are installed here")
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(recipe_dict(tiny, "liger", tmp_path, liger_kernel=True))
    assert "training.liger_kernel: needs" in str(e.value) and "pip install 'edora-pipeline[liger]'" in str(e.value)
    # off (the default) needs nothing
    assert recipe_from_dict(recipe_dict(tiny, "plain", tmp_path)).training.liger_kernel is False
