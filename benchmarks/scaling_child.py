"""One rank of a train_scaling.py run, launched by `accelerate launch ... benchmarks/scaling_child.py SPEC.json`.

Runs the real `pipeline train` (pipeline.train.train on the recipe with SPEC's overrides) with benchmarks/step_probe.py
attached, times EDoRA's ZeRO-3 init on this rank (each weight's gather, this rank's share of the SVDs, the factor
broadcasts: pipeline/edora/model.py splits the SVDs round-robin over the ranks), and writes RANK_DIR/rank{i}.json:
this rank's tokens/s, peak GPU memory and init times. With SPEC["logits"], every rank then runs the trained, still
sharded model on fixed token ids (ZeRO-3 needs all ranks in a forward) and rank 0 saves the logits for the merge check.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import flops  # noqa: E402
from step_probe import StepProbe  # noqa: E402
from train_throughput import metrics  # noqa: E402

import pipeline.edora.layer as edora_layer  # noqa: E402
import pipeline.edora.model as edora_model  # noqa: E402
import pipeline.trainer as trainer_mod  # noqa: E402
from pipeline.recipe import load_recipe  # noqa: E402
from pipeline.train import train  # noqa: E402

# fixed prompts of the merge check: 2 rows x 16 token ids, the same on every rank and in the parent
PROMPT_ROWS, PROMPT_LEN = 2, 16


def prompt_ids(vocab: int) -> torch.Tensor:
    return (torch.arange(PROMPT_ROWS * PROMPT_LEN).reshape(PROMPT_ROWS, PROMPT_LEN) * 7 + 3) % vocab


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class InitTimer:
    """Wall time of each phase of EDoRA's init on this rank (synchronized around each call, so GPU work counts)."""

    def __init__(self):
        self.s = {"gather_s": 0.0, "svd_s": 0.0, "broadcast_s": 0.0, "inject_s": 0.0}
        self.n = {"svd_calls": 0, "layers": 0, "broadcasts": 0}

    def wrap(self, owner, name: str, key: str, count: str | None = None, module_level: bool = False):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            _sync()
            t = time.perf_counter()
            out = real(*args, **kwargs)
            _sync()
            self.s[key] += time.perf_counter() - t
            if count:
                self.n[count] += 1
            return out

        setattr(owner, name, timed)

    def install(self) -> None:
        self.wrap(edora_layer, "truncated_svd", "svd_s", "svd_calls")  # looked up in layer.py's namespace
        self.wrap(edora_layer.Linear, "_base_weight_fp32", "gather_s", "layers")
        self.wrap(edora_layer.Linear, "broadcast_factors", "broadcast_s", "broadcasts")
        model_cls = edora_model.EdoraModel
        begin, end = model_cls._begin_injection, model_cls._end_injection

        def begin_(tuner, *a, **k):
            self._t0 = time.perf_counter()
            return begin(tuner, *a, **k)

        def end_(tuner, *a, **k):
            out = end(tuner, *a, **k)
            _sync()
            self.s["inject_s"] += time.perf_counter() - self._t0
            return out

        model_cls._begin_injection, model_cls._end_injection = begin_, end_

    def record(self) -> dict:
        return {**{k: round(v, 3) for k, v in self.s.items()}, **self.n}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    timer = InitTimer()
    timer.install()
    cuda = torch.cuda.is_available()
    probe = StepProbe(spec["warmup"], spec["measure"], profile_last=False)
    orig = trainer_mod.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = orig(*args, **kwargs)
        probe.attach(trainer)
        return trainer

    trainer_mod.make_trainer = make_trainer
    t = time.time()
    recipe = load_recipe(ROOT / spec["recipe"], spec["overrides"])
    trainer = train(recipe)
    rank, world = trainer.args.process_index, trainer.args.world_size
    row = {"rank": rank, "world": world, "train_wall_s": round(time.time() - t, 1), "init": timer.record()}
    if cuda:
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        row["device"] = torch.cuda.current_device()
    shape = spec["shape"]
    tr = recipe.training
    recomputed = flops.checkpointed_layers(shape["L"], tr.gradient_checkpointing, tr.checkpoint_every_n_layers)
    ns = SimpleNamespace(warmup=spec["warmup"], measure=spec["measure"], peak_tflops=spec["peak_tflops"],
                         layers=shape["L"], tiny=spec["tiny"])
    row.update(metrics(probe.summary(), ns, shape, recomputed))
    row["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # this shard

    if spec.get("logits"):
        model = trainer.model_wrapped
        model.eval()
        ids = prompt_ids(trainer.model.config.vocab_size).to(trainer.args.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if trainer.is_world_process_zero():
            torch.save({"ids": ids.cpu(), "logits": logits.float().cpu()}, Path(spec["rank_dir"]) / "logits.pt")
    (Path(spec["rank_dir"]) / f"rank{rank}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
