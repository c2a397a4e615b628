"""The SFTTrainer the train stage uses: log lines with tokens/s and an ETA (also in metrics.jsonl), EDoRA's magnitude
in its own optimizer group, transformers' progress bar without its printed dicts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipeline.errors import UserError

logger = logging.getLogger("pipeline.train")  # the train stage's log, as before this module was split off


def make_trainer(model, sft_args, train_ds, eval_ds, tokenizer, peft_config, run_dir: Path,
                 magnitude_lr_ratio: float | None = None, base_model: str | None = None, padding_free: bool = False):
    import torch
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        """SFTTrainer whose log lines carry tokens/s and an ETA, and land in metrics.jsonl; EDoRA's magnitude can
        have its own learning rate."""

        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            if magnitude_lr_ratio is not None and magnitude_lr_ratio != 1:
                split_magnitude_group(opt, self.model, magnitude_lr_ratio)
            return opt

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
    if padding_free:
        use_padding_free(trainer)
    return trainer


def use_padding_free(trainer) -> None:
    """Flatten each micro-batch into one row: TRL's collator then drops the padding and emits position_ids that
    restart at every example (the attention masks are built from them) and labels -100 at each example's first
    token, so the loss is the padded batch's: the sum over completion tokens / their count. Set here rather than
    in SFTConfig, whose padding_free without packing TRL 1.16 refuses when max_length is set, though its dataset
    preparation truncates every row to max_length either way (sft_trainer.py, "Truncate to max_length")."""
    collator = trainer.data_collator
    if not hasattr(collator, "padding_free"):
        raise UserError(f"training.padding_free needs TRL's language-modeling collator, not {type(collator).__name__}")
    collator.padding_free = True
    trainer.padding_free = True


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


def split_magnitude_group(optimizer, model, ratio: float) -> None:
    """Move EDoRA's magnitudes into param groups of their own at `ratio` x the group's learning rate (the scheduler,
    built afterwards, scales every group's own initial lr)."""
    mags = {id(p) for n, p in model.named_parameters() if p.requires_grad and "edora_magnitude" in n}
    if not mags:
        raise UserError("adapter.magnitude_lr_ratio is set but the model has no trainable EDoRA magnitude")
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in mags]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in mags]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                       "lr": group["lr"] * ratio})
    logger.info("magnitude learning rate: %g x training.learning_rate", ratio)


def log_trainable(model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}",
                100 * trainable / max(total, 1))


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
