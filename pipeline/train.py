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
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.trainer import plot_loss, read_metrics  # noqa: F401 - read_metrics: re-exported

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
FULL_DIR = "merged"  # where a full fine-tune (adapter.method: full) writes its model


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/mistral-7b/edora-metamathqa.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in runs/<name>/ (same recipe and overrides)")
    parser.add_argument("--new-run", action="store_true",
                        help="when runs/<name>/ was trained with a recipe that differs in what it trains, start a "
                             "new run <name>-<recipe hash> instead of refusing")
    parser.epilog = "Any recipe key can be overridden: --training.learning_rate=1e-4 --adapter.r=32"


def main(args) -> int:
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    train(recipe, resume=args.resume, new_run=args.new_run)
    return 0


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def checkpoint_complete(ckpt: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without it (a kill during the save) is incomplete."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("adapter_model.*")) or any(ckpt.glob("model*.safetensors"))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint-N; incomplete ones are renamed incomplete-checkpoint-N (kept, never used)."""
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for p in [p for p in ckpts if not checkpoint_complete(p)]:
        aside = p.with_name("incomplete-" + p.name)
        if is_main_process() and not aside.exists():
            p.rename(aside)
            logger.warning("%s is incomplete (no trainer_state.json or weights: a save was interrupted); moved it "
                           "to %s and skipped it", p, aside.name)
        ckpts.remove(p)
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    ckpt = last_checkpoint(run_dir) if run_dir.exists() else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint-* folder in {run_dir}; run without --resume to start training")
    held = next((d for d in (ADAPTER_DIR, FULL_DIR) if (run_dir / d).exists()), None)
    if not resume and (ckpt is not None or held):
        raise UserError(f"{run_dir} already holds a run ({ckpt.name if ckpt else held}). Pass --resume to "
                        "continue it, or set another --name / --output_dir; nothing was overwritten")
    return ckpt


def train(recipe, resume: bool = False, new_run: bool = False):
    """Run one recipe; the adapter lands in runs/<name>/adapter. Returns the trainer (for scripts and tests).

    Holds the run dir's lock, and checks the recipe against the stored one before anything is written."""
    from pipeline.runstate import check_recipe, run_lock

    check_launcher(recipe)
    with run_lock(Path(recipe.run_dir)):
        recipe = check_recipe(recipe, new_run=new_run)
        with run_lock(Path(recipe.run_dir)):  # a new run's own dir (a no-op when the name is unchanged)
            return _train(recipe, resume)


def check_launcher(recipe) -> None:
    """A ZeRO-3 recipe run as a plain process would train without DeepSpeed: refuse, with the command to use."""
    import yaml

    acc = recipe.launcher.accelerate_config
    if not acc or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return
    settings = yaml.safe_load(Path(acc).read_text()) or {}
    if settings.get("distributed_type") == "DEEPSPEED":
        n = recipe.launcher.num_processes
        command = sys.argv[1] if sys.argv[1:2] in (["train"], ["run"]) else "train"
        rest = " ".join(sys.argv[2:]) if sys.argv[1:2] == [command] else "RECIPE.yaml"
        raise UserError(f"the recipe's launcher.accelerate_config ({acc}) uses DeepSpeed, but this process was not "
                        f"started by accelerate (it would train without DeepSpeed). Run: accelerate launch "
                        f"--config_file {acc} --num_processes {n} -m pipeline {command} {rest}; or "
                        "set --launcher.accelerate_config=null to train without it")


def _train(recipe, resume: bool):
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    from pipeline import trackers
    from pipeline.data import load_sft_dataset, truncation_report
    from pipeline.modeling import load_model, load_tokenizer
    from pipeline.recipe import build_peft_config, save_recipe
    from pipeline.trainer import log_trainable, make_trainer

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
    trackers.prepare(run_dir)

    # SFTConfig first: under a ZeRO-3 launcher it activates DeepSpeed so from_pretrained loads the model sharded.
    # use_cpu without a GPU: otherwise a multi-process CPU launch (gloo) sees world size 1 and DeepSpeed's
    # batch-size check fails.
    if recipe.training.liger_kernel and not torch.cuda.is_available():
        raise UserError("training.liger_kernel: Liger-Kernel's Triton kernels need a CUDA GPU and this machine has "
                        "none; set --training.liger_kernel=false")
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
    formats = stats["train"]["format"]  # one per source when data.source is a list
    prompt_format = "chat" if "messages" in (formats if isinstance(formats, list) else [formats]) else "metamath"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data.format messages needs a chat template, and the tokenizer of {recipe.model.name_or_path} "
                        "has none; use a chat model, or data.format alpaca / metamathqa")
    stats["truncation"] = truncation_report(train_ds, tokenizer, recipe.data.max_length)
    logger.info(data_summary(stats, recipe.data.max_length))
    if is_main_process():
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))

    peft_config = build_peft_config(recipe.adapter)
    is_edora = recipe.adapter.uses_svd
    if is_edora and zero3 and quant is None and recipe.model.dtype != "float32":
        # ZeRO-3 all-gathers small (persistent) parameters in one buffer of one dtype: fp32 R and m beside bf16
        # norms fail there (DeepSpeed #8072). DeepSpeed keeps fp32 master copies, so bf16 R and m lose nothing.
        peft_config.adapter_dtype = recipe.model.dtype

    trainer = make_trainer(model, sft_args, train_ds, eval_ds, tokenizer, peft_config, run_dir,
                           magnitude_lr_ratio=recipe.adapter.magnitude_lr_ratio, base_model=recipe.model.name_or_path,
                           padding_free=recipe.training.padding_free)
    if is_edora and quant is not None and not deepspeed:
        # TRL casts a quantized model's trainable parameters to bf16; without DeepSpeed's fp32 master weights,
        # bf16 m (values ~1, updates ~1e-3) would stop moving. R and m are tiny: keep them fp32.
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ("edora_R" in name or "edora_magnitude" in name):
                p.data = p.data.float()
    log_trainable(trainer.model)

    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    if eval_ds is not None and trainer.state.global_step % sft_args.eval_steps:
        trainer.evaluate()  # the held-out loss of the final adapter, not only of the last eval_steps multiple

    if recipe.adapter.method == "full":
        finish_full(recipe, trainer, tokenizer, run_dir)
        if trainer.is_world_process_zero():
            trackers.record(run_dir, trainer)
        return trainer
    adapter_dir = run_dir / ADAPTER_DIR
    # PEFT records the model's directory; keep the recipe's exact base (a .gguf file, a pkg:// path) for the merge
    for cfg in getattr(trainer.model, "peft_config", {}).values():
        cfg.base_model_name_or_path = recipe.model.name_or_path
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        finish_run(recipe, trainer, tokenizer, adapter_dir, run_dir, prompt_format)
        trackers.record(run_dir, trainer)
    return trainer


def data_summary(stats: dict, max_length: int) -> str:
    """One log line saying how many rows train and why the others do not, or only in part."""
    tr, tc = stats["train"], stats["truncation"]
    used = tr["kept"] - tc["prompt_too_long"] - tr.get("held_out_for_eval", 0)
    return (f"data: {used} of {tr['rows']} rows train; dropped: {tr['malformed']} malformed (see data_stats.json), "
            f"{tc['prompt_too_long']} whose prompt alone fills max_length={max_length} (no solution token left; "
            f"TRL drops them); truncated: {tc['truncated'] - tc['prompt_too_long']} cut at max_length (solution "
            "shortened)" + (f"; {tr['held_out_for_eval']} held out for eval" if tr.get("held_out_for_eval") else ""))


def finish_run(recipe, trainer, tokenizer, adapter_dir: Path, run_dir: Path, prompt_format: str) -> None:
    """The adapter's tokenizer and edora_meta.json (the prompt format: metamath, the Alpaca text; chat, the
    tokenizer's chat template), the trainer state and the loss plot."""
    from pipeline.adapter_meta import AdapterMeta
    from pipeline.edora.loader import add_card_note
    from pipeline.merging.checks import training_fingerprint

    tokenizer.save_pretrained(adapter_dir)
    # read by `pipeline merge` (the base fingerprint, the 4-bit round trip) and `pipeline eval --prompt auto`
    AdapterMeta.for_training(
        recipe.model, method=recipe.adapter.method, recipe=recipe.name, global_step=trainer.state.global_step,
        base_fingerprint=training_fingerprint(recipe.model.name_or_path, next(adapter_dir.glob("adapter_model.*"))),
        prompt_format=prompt_format).write(adapter_dir)
    if recipe.adapter.uses_svd:
        add_card_note(adapter_dir)
    trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.name)
    logger.info("adapter saved to %s; merge it with: python -m pipeline merge --adapter %s", adapter_dir, adapter_dir)


def finish_full(recipe, trainer, tokenizer, run_dir: Path):
    """A full fine-tune has no adapter: the trained model is the merged checkpoint (runs/<name>/merged)."""
    out = run_dir / FULL_DIR
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        trainer.state.save_to_json(str(run_dir / "trainer_state.json"))
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=recipe.name)
        logger.info("full fine-tune saved to %s (a plain checkpoint: nothing to merge)", out)
    return trainer


