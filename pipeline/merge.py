"""`python -m pipeline merge`: fold an EDoRA adapter into its base and write a plain Hugging Face checkpoint.

    python -m pipeline merge --adapter runs/<name>/adapter [--base ID_OR_DIR] [--out DIR] [--dtype bfloat16]

Each adapted weight becomes W' = (m / n) ⊙_row (W0 + s·B R A) (n: the row norms of W0 + s·B R A). The merge streams
a safetensors base tensor by tensor into new shards, so a 7B model merges in a few GB of RAM. The output (sharded
safetensors + index, config.json, generation_config.json, tokenizer, merge_report.json) is written to a hidden
`.<out>.partial-<pid>` dir beside --out and renamed at the end: an interrupted merge never leaves a
complete-looking dir.

Verification (on by default, `--no-verify` skips it): the adapter model (base + adapter through PEFT) and the
merged model run on the same fixed prompts, one after the other; the max |logit difference| must stay within
TOLERANCES (pipeline/merging/verify.py) for the output dtype, relative to the largest |logit| of the reference, and the argmax agreement must
reach MIN_AGREEMENT. Measured on CPU (max |diff| / max |logit|, argmax agreement), tiny random Llama and
SmolLM2-135M with an r=8 adapter: float32 3.8e-7 / 4.0e-6 (100%), bfloat16 8.2e-3 / 4.4e-2 (99.4% / 97.4%),
float16 1.0e-3 / 6.2e-3 (100%).

Adapters trained on a 4-bit base (edora_meta.json, or a resolved recipe with model.load_in_4bit, beside the
adapter): `--into full` (default, the QLoRA convention) merges into the full-precision base weights;
`--into dequantized` merges into the base weights after the same NF4/FP4 round trip training saw, which
reproduces the trained model exactly. Both are checked against the adapter on the 4-bit base and on the full base.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from pipeline.dtypes import FLOAT_DTYPES
from pipeline.errors import UserError

logger = logging.getLogger(__name__)



def add_arguments(parser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter dir written by training (runs/<name>/adapter)")
    parser.add_argument("--base", default=None,
                        help="base model: hub id, local dir, .gguf file or pkg://module/file (default: "
                             "base_model_name_or_path from the adapter's adapter_config.json)")
    parser.add_argument("--out", default=None, help="output dir (default: 'merged' beside the adapter dir)")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default=None,
                        help="dtype of the merged checkpoint (default: the base checkpoint's, else bfloat16)")
    parser.add_argument("--into", choices=("full", "dequantized"), default="full",
                        help="for adapters trained on a 4-bit base: merge into the full-precision base weights "
                             "(full, the QLoRA convention) or into the 4-bit-dequantized ones (reproduces the "
                             "trained model exactly)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the adapter and merged models to compare their logits")
    parser.add_argument("--verify-device", default="auto", help="device for verification: auto, cpu, cuda")
    parser.add_argument("--max-shard-size", default="4GB", help="max size of one output shard (e.g. 4GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous merge output (a dir with merge_report.json); never a run, a base "
                             "model or the adapter")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * units[u])
            except ValueError:
                break
    raise UserError(f"--max-shard-size {text!r} is not a size; write e.g. 4GB or 500MB")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def resolve_base(spec: str) -> tuple[str, Path | None]:
    """(spec to load with transformers, local dir with safetensors or None). Hub ids are downloaded (cached)."""
    from pipeline.specs import ModelSpec

    try:
        model = ModelSpec.parse(spec)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    if model.kind == "gguf" or (model.kind == "missing" and (spec.startswith("pkg://") or spec.endswith(".gguf"))):
        if model.kind == "missing":
            raise UserError(f"base {spec}: {model.path} does not exist")
        return str(model.path), None
    if model.kind == "dir":
        p = model.path
        has_st = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
        if not (p / "config.json").is_file():
            raise UserError(f"base {p} has no config.json: not a Hugging Face model dir")
        return str(p), (p if has_st else None)
    if model.kind == "missing":
        raise UserError(f"base {spec} does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                             "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; the message says what happened
        raise UserError(f"cannot get the base model {spec!r} from the Hugging Face hub: {e}") from e
    has_st = any(local.glob("*.safetensors"))
    return (str(local), local if has_st else None)


def base_dtype_name(base_dir: Path | None) -> str | None:
    if base_dir is None:
        return None
    cfg = json.loads((base_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in FLOAT_DTYPES else None


def copy_tokenizer(adapter_dir: Path, base_spec: str, base_dir: Path | None, out: Path) -> str:
    from pipeline.merging.adapter import TOKENIZER_FILES, has_tokenizer

    for src in (adapter_dir, base_dir, Path(base_spec) if Path(base_spec).is_dir() else None):
        if src is not None and has_tokenizer(src):
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out / name)
            return str(src)
    if base_spec.endswith(".gguf"):
        from pipeline.modeling import load_tokenizer

        load_tokenizer(base_spec).save_pretrained(str(out))
        return base_spec
    logger.warning("no tokenizer in the adapter dir or the base: the merged dir has none (vLLM needs one)")
    return "none"


def write_config(base_dir: Path, out: Path, dtype: str) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out))).save_pretrained(str(out))


def main(args) -> int:
    merge(args.adapter, args.out, base=args.base, dtype=args.dtype, into=args.into, verify=args.verify,
          verify_device=args.verify_device, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(Path(args.out) if args.out else default_out(Path(args.adapter)))
    return 0


def default_out(adapter_dir: Path) -> Path:
    """Where a merge writes by default: 'merged' beside the adapter dir (runs/<name>/merged)."""
    return adapter_dir.parent / "merged"


def merge(adapter: str | Path, out: str | Path | None = None, base: str | None = None, dtype: str | None = None,
          into: str = "full", verify: bool = True, verify_device: str = "auto", max_shard_size: str = "4GB",
          overwrite: bool = False) -> dict:
    """Merge the adapter dir into its base (default: the one adapter_config.json names) and write a plain checkpoint
    to `out` (default: 'merged' beside the adapter); returns the merge report (merge_report.json). Raises UserError
    for bad input and when the verification fails."""
    import torch

    import pipeline.edora  # noqa: F401 - registers EDoRA with PEFT (verification loads the adapter through PEFT)
    from pipeline.merging.adapter import read_adapter
    from pipeline.merging.checks import check_base_fingerprint, check_out_dir, clean_stale_partials
    from pipeline.merging.verify import verify_merge

    t_start = time.perf_counter()
    adapter = read_adapter(adapter)
    base_spec = base or adapter.config.get("base_model_name_or_path")
    if not base_spec:
        raise UserError(f"{adapter.dir}/adapter_config.json records no base_model_name_or_path; pass --base")
    if into == "dequantized":
        if adapter.quant is None:
            raise UserError(f"--into dequantized needs to know how the base was quantized in training, and nothing "
                            f"in {adapter.dir} says it was (no edora_meta.json with base_load_in_4bit: true, no "
                            "resolved recipe with model.load_in_4bit). Use --into full.")
        if adapter.peft_type != "EDORA":
            raise UserError("--into dequantized is supported for EDoRA adapters only")
    out = Path(out) if out else default_out(adapter.dir)
    check_out_dir(out, overwrite, {"adapter": adapter.dir})
    max_shard = parse_size(max_shard_size)
    load_spec, base_dir = resolve_base(base_spec)
    check_out_dir(out, overwrite, {"adapter": adapter.dir, "base model": Path(load_spec)})
    clean_stale_partials(out)
    base_check = check_base_fingerprint(adapter, base_dir)
    dtype_name = dtype or base_dtype_name(base_dir) or "bfloat16"
    torch_dtype = getattr(torch, dtype_name)
    if base_dir is not None and "quantization_config" in json.loads((base_dir / "config.json").read_text()):
        raise UserError(f"the base checkpoint {base_dir} is itself quantized (config.json has quantization_config); "
                        "merge needs the full-precision base (for a 4-bit-trained adapter, use --into dequantized "
                        "with the full-precision base)")
    if dtype_name == "float16" and base_dtype_name(base_dir) == "bfloat16":
        logger.warning("the base is bfloat16 and the output float16: weights are checked for overflow, but "
                       "activations of a bfloat16-trained model can still overflow float16")
    logger.info("merging %s (%s, r=%s) into %s as %s (%s)", adapter.dir, adapter.peft_type, adapter.config.get("r"),
                base_spec, dtype_name, "streamed" if base_dir is not None and adapter.peft_type == "EDORA"
                else "in memory")
    if adapter.quant is not None:
        logger.info("adapter was trained on a 4-bit base (%s, from %s): merging into the %s weights",
                    adapter.quant.quant_type, adapter.quant.source, into)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report = _merge_into(tmp, adapter, base_spec, load_spec, base_dir, dtype_name, torch_dtype, into, max_shard)
        _check_result(tmp, adapter, base_dir, report)
        report["base_fingerprint"] = base_check
        report["timing_s"]["merge"] = time.perf_counter() - t_start
        report["peak_rss_gib"]["merge"] = peak_rss_gib()
        failed = None
        if verify:
            t0 = time.perf_counter()
            report["verification"] = verify_merge(tmp, adapter, load_spec, dtype_name, into, verify_device)
            report["timing_s"]["verify"] = time.perf_counter() - t0
            v = report["verification"]
            if not v["passed"]:
                failed = v
        else:
            report["verification"] = {"skipped": True}
        report["peak_rss_gib"]["total"] = peak_rss_gib()
        report["timing_s"]["total"] = time.perf_counter() - t_start
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if failed:
            rejected = out.parent / f"{out.name}.rejected"
            shutil.rmtree(rejected, ignore_errors=True)
            tmp.rename(rejected)
            g = failed["comparisons"][failed["gate"]]
            raise UserError(f"verification failed: the merged model's logits differ from the adapter model's by up "
                            f"to {g['max_abs_logit_diff']:.4g} = {g['rel_logit_diff']:.3g} of the largest logit "
                            f"(tolerance for {failed['tolerance_dtype']}: {failed['tolerance']}), argmax agreement "
                            f"{g['argmax_agreement']:.1%} (needed: {failed['min_agreement']:.0%}). "
                            f"The merged checkpoint is kept for inspection in {rejected} (see merge_report.json); "
                            f"{out} was not written.")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    v = report["verification"]
    if v.get("skipped"):
        logger.info("merged into %s (verification skipped)", out)
    else:
        g = v["comparisons"][v["gate"]]
        logger.info("merged into %s; verified: max |logit diff| %.3g = %.3g of the largest logit (tolerance %g), "
                    "argmax agreement %.1f%%", out, g["max_abs_logit_diff"], g["rel_logit_diff"], v["tolerance"],
                    100 * g["argmax_agreement"])
    return report


def _check_result(tmp: Path, adapter, base_dir, report: dict) -> None:
    """Checks that read the saved files, not the adapter as PEFT loaded it (pipeline/merging/checks.py)."""
    from pipeline.merging.checks import adapter_is_trained, check_formula

    stats = report["stats"]
    if stats["weights_changed"] == 0 and adapter_is_trained(adapter):
        raise UserError(f"the merge changed no weight of the base, yet the adapter in {adapter.dir} is trained: "
                        "a no-op merge (the adapter was not applied). Check adapter_config.json against the "
                        "tensors; nothing was written")
    if report["method"] == "streamed":
        from pipeline.merging.st_io import BaseCheckpoint

        report["formula_max_rel_diff"] = check_formula(tmp, BaseCheckpoint(base_dir), adapter, report["into"])
    else:  # checked while merging in memory (checks.formula_residual); None for PEFT's own LoRA merge
        report["formula_max_rel_diff"] = stats.get("formula_max_rel_diff")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished dir into place; an existing (empty, or --overwrite) dir is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_into(tmp: Path, adapter, base_spec, load_spec, base_dir, dtype_name, dtype, into: str, max_shard) -> dict:
    from pipeline.merging import stream

    if adapter.peft_type == "EDORA" and base_dir is not None:
        from pipeline.merging.st_io import BaseCheckpoint

        stats, shards = stream.stream_merge(BaseCheckpoint(base_dir), adapter, tmp, dtype, into, max_shard)
        write_config(base_dir, tmp, dtype_name)
        method = "streamed"
    else:
        from pipeline.modeling import load_model

        logger.warning("this merge loads the whole base model in float32 (%s)", "a plain PEFT adapter" if
                       adapter.peft_type != "EDORA" else "the base is not a safetensors checkpoint")
        model = load_model(load_spec, dtype="float32")
        if adapter.peft_type == "EDORA":
            stats = stream.memory_merge(model, adapter, dtype, into)
            method = "in_memory"
        else:
            model, stats = stream.peft_merge(model, adapter, dtype)
            method = "peft_merge_and_unload"
        model.config.dtype = dtype_name
        model.save_pretrained(str(tmp), max_shard_size=max_shard)
        del model
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
    tokenizer_from = copy_tokenizer(adapter.dir, load_spec, base_dir, tmp)
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, "-m", "pipeline", *sys.argv[1:]] if sys.argv[0].endswith(
            ("pipeline", "__main__.py")) else None,
        "adapter": {"dir": str(adapter.dir.resolve()), "peft_type": adapter.peft_type, "r": adapter.config.get("r"),
                    "lora_alpha": adapter.config.get("lora_alpha"), "use_magnitude": adapter.config.get(
                        "use_magnitude"), "trained_on_4bit": adapter.quant.to_json() if adapter.quant else None},
        "base": {"spec": base_spec, "resolved": load_spec},
        "method": method,
        "into": into if adapter.quant is not None else "full",
        "dtype": dtype_name,
        "shards": shards,
        "tokenizer_from": tokenizer_from,
        "stats": stats.to_json(),
        "timing_s": {},
        "peak_rss_gib": {},
    }
