"""Launched by tests (plain python or `accelerate launch`): train a recipe through pipeline.train, then run the
trained model on fixed token ids on every rank (ZeRO-3 needs all ranks in a forward) and save rank 0's logits."""

import json
import sys

import torch

import pipeline.edora.layer as edora_layer
from pipeline.cli import setup_logging
from pipeline.recipe import load_recipe
from pipeline.train import train

recipe_path, out_path, *overrides = sys.argv[1:]
setup_logging()
svd_calls = 0
real_svd = edora_layer.truncated_svd


def counting_svd(*args, **kwargs):
    global svd_calls
    svd_calls += 1
    return real_svd(*args, **kwargs)


edora_layer.truncated_svd = counting_svd
trainer = train(load_recipe(recipe_path, overrides))
model = trainer.model_wrapped
model.eval()
ids = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % trainer.model.config.vocab_size
with torch.no_grad():
    logits = model(input_ids=ids).logits
if trainer.is_world_process_zero():
    torch.save({"ids": ids, "logits": logits.float().cpu()}, out_path)

# per rank: how many SVDs it ran and a checksum of its frozen factors (must agree across ranks)
factors = [m for m in trainer.model.modules() if isinstance(m, edora_layer.Linear)]
checksum = sum(float(m.edora_A["default"].double().abs().sum() + m.edora_B["default"].double().abs().sum())
               for m in factors)
with open(f"{out_path}.rank{trainer.args.process_index}.json", "w") as f:
    json.dump({"svd_calls": svd_calls, "layers": len(factors), "checksum": checksum}, f)
