"""`python -m pipeline train RECIPE.yaml [--key=value ...] [--resume]`: SFT with TRL + EDoRA (or a baseline).

Reads top to bottom: recipe -> run dir -> SFTConfig (before the model, so ZeRO-3 can shard it while loading) ->
tokenizer, model, data -> SFTTrainer with the adapter's peft_config -> train (resumable) -> adapter + records.
Under DeepSpeed ZeRO-3 launch it with `accelerate launch --config_file recipes/accelerate/zero3.yaml -m pipeline
train ...` (also on one GPU).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from pipeline.cli import UserError

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
META_FILE = "edora_meta.json"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/mistral-7b/edora-metamathqa.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in runs/<name>/ (same recipe and overrides)")
    parser.epilog = "Any recipe key can be overridden: --training.learning_rate=1e-4 --adapter.r=32"


def main(args) -> int:
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume)
    return 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    ckpt = last_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint-* folder in {run_dir}; run without --resume to start training")
    if not resume and (ckpt is not None or (run_dir / ADAPTER_DIR).exists()):
        raise UserError(f"{run_dir} already holds a run ({ckpt.name if ckpt else ADAPTER_DIR}). Pass --resume to "
                        "continue it, or set another --name / --output_dir; nothing was overwritten")
    return ckpt


def train(recipe, resume: bool = False):
    """Run one recipe; the adapter lands in runs/<name>/adapter. Returns the trainer (for scripts and tests)."""
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    from pipeline.data import load_sft_dataset, truncation_report
    from pipeline.modeling import load_model, load_tokenizer
    from pipeline.recipe import build_peft_config, save_recipe

    run_dir = Path(recipe.run_dir)
    ckpt = check_run_dir(run_dir, resume)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != recipe.launcher.num_processes:
        logger.warning("launched with %d processes but the recipe says launcher.num_processes=%d: the effective "
                       "batch is %d x %d x %d", world, recipe.launcher.num_processes,
                       recipe.training.per_device_train_batch_size, recipe.training.gradient_accumulation_steps, world)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    set_seed(recipe.seed)

    # SFTConfig first: under a ZeRO-3 launcher it activates DeepSpeed so from_pretrained loads the model sharded.
    # use_cpu without a GPU: otherwise a multi-process CPU launch (gloo) sees world size 1 and DeepSpeed's
    # batch-size check fails.
    sft_args = SFTConfig(**recipe.sft_config_kwargs(), include_num_input_tokens_seen="non_padding",
                         logging_first_step=True, use_cpu=not torch.cuda.is_available())
    deepspeed = sft_args.deepspeed_plugin is not None
    zero3 = deepspeed and sft_args.deepspeed_plugin.zero_stage == 3

    tokenizer = load_tokenizer(recipe.model.name_or_path)
    quant = recipe.model.bnb_config()
    device_map = None
    if not deepspeed and torch.cuda.is_available():
        # straight onto this process's GPU: EDoRA's SVD init then runs there (a 7B model: seconds, not minutes on
        # the CPU), and bitsandbytes quantizes there
        device_map = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    elif quant is not None and not deepspeed:
        device_map = "cpu"
    model = load_model(recipe.model.name_or_path, recipe.model.dtype, recipe.model.attn_implementation,
                       quantization_config=quant, device_map=device_map)

    train_ds, eval_ds, stats = load_sft_dataset(recipe.data, recipe.seed)
    stats["truncation"] = truncation_report(train_ds, tokenizer, recipe.data.max_length)
    logger.info("data: %d training rows (%d malformed dropped), %d truncated at max_length=%d",
                len(train_ds), stats["train"]["malformed"], stats["truncation"]["truncated"], recipe.data.max_length)
    if is_main_process():
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))

    peft_config = build_peft_config(recipe.adapter)
    is_edora = recipe.adapter.method in ("edora", "loraxs")
    if is_edora and zero3 and quant is None and recipe.model.dtype != "float32":
        # ZeRO-3 all-gathers small (persistent) parameters in one buffer of one dtype: fp32 R and m beside bf16
        # norms fail there (DeepSpeed #8072). DeepSpeed keeps fp32 master copies, so bf16 R and m lose nothing.
        peft_config.adapter_dtype = recipe.model.dtype

    trainer = make_trainer(model, sft_args, train_ds, eval_ds, tokenizer, peft_config, run_dir,
                           base_model=recipe.model.name_or_path)
    if is_edora and quant is not None and not deepspeed:
        # TRL casts a quantized model's trainable parameters to bf16; without DeepSpeed's fp32 master weights,
        # bf16 m (values ~1, updates ~1e-3) would stop moving. R and m are tiny: keep them fp32.
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ("edora_R" in name or "edora_magnitude" in name):
                p.data = p.data.float()
    log_trainable(trainer.model)

    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

    adapter_dir = run_dir / ADAPTER_DIR
    # PEFT records the model's directory; keep the recipe's exact base (a .gguf file, a pkg:// path) for the merge
    for cfg in getattr(trainer.model, "peft_config", {}).values():
        cfg.base_model_name_or_path = recipe.model.name_or_path
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        finish_run(recipe, trainer, tokenizer, adapter_dir, run_dir)
    return trainer


def make_trainer(model, sft_args, train_ds, eval_ds, tokenizer, peft_config, run_dir: Path,
                 base_model: str | None = None):
    import torch
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        """SFTTrainer whose log lines carry tokens/s and an ETA, and land in metrics.jsonl."""

        def log(self, logs: dict, start_time: float | None = None) -> None:
            now = time.time()
            if not hasattr(self, "_t0"):
                self._t0, self._step0, self._tok0 = now, self.state.global_step, self.state.num_input_tokens_seen
            steps = self.state.global_step - self._step0
            if "loss" in logs and steps > 0 and now > self._t0:
                elapsed = now - self._t0
                logs["tokens_per_second"] = round((self.state.num_input_tokens_seen - self._tok0) / elapsed, 1)
                logs["eta_seconds"] = round((self.state.max_steps - self.state.global_step) * elapsed / steps)
            if "loss" in logs and torch.cuda.is_available():
                logs["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            super().log(logs, start_time)
            if self.is_world_process_zero():
                row = {"step": self.state.global_step, "epoch": self.state.epoch, **logs,
                       "tokens_seen": int(self.state.num_input_tokens_seen), "time": now}
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if "loss" in logs:
                    eta = logs.get("eta_seconds")
                    logger.info("step %d/%d  loss %.4f  lr %.3g  %s tok/s  ETA %s", self.state.global_step,
                                self.state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")),
                                logs.get("tokens_per_second", "-"),
                                time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-")
                elif "eval_loss" in logs:
                    logger.info("step %d/%d  eval loss %.4f", self.state.global_step, self.state.max_steps,
                                logs["eval_loss"])
                elif "train_runtime" in logs:
                    logger.info("training done: %d steps in %.0f s, mean loss %.4f", self.state.global_step,
                                logs["train_runtime"], logs.get("train_loss", float("nan")))

        def create_model_card(self, *args, **kwargs) -> None:
            # TRL names the base model only when it is a hub id ("None" for a local dir or a .gguf file)
            super().create_model_card(*args, **kwargs)
            card = Path(self.args.output_dir) / "README.md"
            if base_model and self.is_world_process_zero() and card.exists():
                text = card.read_text()
                text = text.replace("[None](https://huggingface.co/None)", f"`{base_model}`")
                text = text.replace('model="None"', f'model="{Path(self.args.output_dir) / "merged"}"')
                card.write_text(text)

    trainer = Trainer(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, peft_config=peft_config)
    quiet_progress(trainer)
    return trainer


def quiet_progress(trainer) -> None:
    """Keep transformers' progress bar but drop its printed log dicts: Trainer.log above prints one line per step."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) is ProgressCallback:
            trainer.remove_callback(cb)
            trainer.add_callback(BarOnly())
        elif type(cb) is PrinterCallback:
            trainer.remove_callback(cb)


def log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1))


def finish_run(recipe, trainer, tokenizer, adapter_dir: Path, run_dir: Path) -> None:
    from pipeline.edora.loader import add_card_note

    tokenizer.save_pretrained(adapter_dir)
    m = recipe.model
    meta = {  # read by `pipeline merge` (pipeline/merging/adapter.py) to redo the 4-bit round trip exactly
        "schema": 1,
        "base_model": m.name_or_path,
        "base_dtype": m.dtype,
        "base_load_in_4bit": m.load_in_4bit,
        "bnb_4bit_quant_type": m.bnb_4bit_quant_type if m.load_in_4bit else None,
        "bnb_4bit_use_double_quant": m.bnb_4bit_use_double_quant if m.load_in_4bit else None,
        "bnb_4bit_compute_dtype": m.bnb_4bit_compute_dtype if m.load_in_4bit else None,
        "bnb_4bit_quant_storage": m.bnb_4bit_quant_storage if m.load_in_4bit else None,
        "bnb_4bit_blocksize": 64 if m.load_in_4bit else None,  # BitsAndBytesConfig's fixed 4-bit blocksize
        "method": recipe.adapter.method,
        "recipe": recipe.name,
        "global_step": trainer.state.global_step,
    }
    (adapter_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    if recipe.adapter.method in ("edora", "loraxs"):
        add_card_note(adapter_dir)
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.name)
    logger.info("adapter saved to %s; merge it with: python -m pipeline merge --adapter %s", adapter_dir, adapter_dir)


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; after a resume, a re-run step replaces the row logged before the interruption."""
    by_key: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            kind = "eval" if any(k.startswith("eval_") for k in row) else "train" if "loss" in row else "other"
            by_key[(kind, row["step"])] = row
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_loss(metrics_path: Path, out_png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
