"""Launched by tests (plain python or `accelerate launch`): train a recipe through pipeline.train, then run the
trained model on fixed token ids on every rank (ZeRO-3 needs all ranks in a forward) and save rank 0's logits."""

import sys

import torch

from pipeline.cli import setup_logging
from pipeline.recipe import load_recipe
from pipeline.train import train

recipe_path, out_path, *overrides = sys.argv[1:]
setup_logging()
trainer = train(load_recipe(recipe_path, overrides))
model = trainer.model_wrapped
model.eval()
ids = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % trainer.model.config.vocab_size
with torch.no_grad():
    logits = model(input_ids=ids).logits
if trainer.is_world_process_zero():
    torch.save({"ids": ids, "logits": logits.float().cpu()}, out_path)
