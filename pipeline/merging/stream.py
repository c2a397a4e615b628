"""The merge itself: W' = (m / n) ⊙_row (W0 + s·B R A) per adapted weight, streamed tensor by tensor into shards.

`stream_merge` works on a local safetensors checkpoint and holds one tensor (plus its fp32 work copies) at a time.
`memory_merge` is the fallback for bases that only transformers can read (GGUF, .bin): it loads the whole model.
`peft_merge` handles plain PEFT LoRA/DoRA adapters with PEFT's own merge_and_unload (also in memory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.errors import UserError

from .adapter import Adapter
from .checks import check_factors, factor_tolerance, formula_residual
from .quant import dequantized_4bit
from .st_io import BaseCheckpoint, Entry, ShardWriter, plan_shards, shard_names, write_index

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0


@dataclass
class MergeStats:
    modules: int = 0
    tensors: int = 0
    fingerprint_max_rel: float = 0.0     # worst (over modules) median relative row-norm difference
    abs_max: float = 0.0                 # largest |value| written, over all floating tensors
    quant_rel_change: list = field(default_factory=list)  # per module: ||W0_deq - W0|| / ||W0|| (into dequantized)
    factor_max_rel: float = 0.0          # worst ||A - Bᵀ W0|| / ||A|| (checks.factor_residual)
    factor_tol: dict = field(default_factory=dict)  # checks.factor_tolerance
    changed: int = 0                     # adapted weights whose written values differ from the base's
    formula_max_rel: float | None = None  # in-memory merges: checks.formula_residual, worst over modules

    def to_json(self) -> dict:
        q = self.quant_rel_change
        return {"modules_merged": self.modules, "tensors_written": self.tensors,
                "fingerprint_max_median_rel_diff": self.fingerprint_max_rel,
                "svd_factor_max_rel_residual": self.factor_max_rel, "svd_factor_tolerance": self.factor_tol,
                "weights_changed": self.changed, "formula_max_rel_diff": self.formula_max_rel, "abs_max": self.abs_max,
                "dequantized_vs_full_weight_rel_diff_mean": (sum(q) / len(q)) if q else None}


def check_shapes(module: str, shape: tuple, adapter: Adapter, part_shapes: dict) -> None:
    """Refuse an adapter made for another architecture/size before anything is written."""
    out_f, in_f = shape if len(shape) == 2 else (None, None)
    r = int(adapter.config["r"])
    expect = {"edora_A": (r, in_f), "edora_B": (out_f, r), "edora_R": (r, r), "edora_magnitude": (out_f,),
              "edora_row_norm2": (out_f,)}
    for part, got in part_shapes.items():
        if tuple(got) != expect[part]:
            raise UserError(f"the adapter does not fit this base model: '{module}.{part}' has shape {tuple(got)}, "
                            f"the base weight {module}.weight is {tuple(shape)} so it should be {expect[part]}. "
                            "It was made for another architecture or size; pass the right --base.")


def merge_weight(module: str, w0: torch.Tensor, adapter: Adapter, into: str, stats: MergeStats) -> torch.Tensor:
    """The merged weight (fp32) of one adapted module, after checking the base is the one the adapter was made on."""
    from pipeline.edora import terms

    w0 = w0.to(torch.float32)
    if into == "dequantized":
        w_full = w0
        w0 = dequantized_4bit(w0, adapter.quant)
        stats.quant_rel_change.append(((w0 - w_full).norm() / w_full.norm().clamp_min(1e-30)).item())
        del w_full
    f = adapter.factors(module)
    rel = terms.fingerprint_deviation(f["edora_row_norm2"], terms.row_norm2(w0))
    rtol = float(adapter.config.get("fingerprint_rtol", 0.05))
    if not rel <= rtol:
        raise UserError(f"the adapter was made on a different base model: the row norms of {module}.weight differ "
                        f"from the ones saved in the adapter by {rel:.2%} (median, tolerance {rtol:.2%}, "
                        "fingerprint_rtol in adapter_config.json). Pass the base it was trained on with --base "
                        f"(adapter_config.json says {adapter.config.get('base_model_name_or_path')!r}).")
    stats.fingerprint_max_rel = max(stats.fingerprint_max_rel, rel)
    # the factors must be the SVD of the weight training saw (the dequantized one for a 4-bit-trained adapter)
    w_seen = w0 if into == "dequantized" or adapter.quant is None else dequantized_4bit(w0, adapter.quant)
    stats.factor_max_rel = max(stats.factor_max_rel, check_factors(module, w_seen, f, adapter, stats.factor_tol))
    del w_seen
    m = f["edora_magnitude"] if adapter.use_magnitude else None
    w, _ = terms.merged_weight(w0, f["edora_A"], f["edora_B"], f["edora_R"], m, adapter.scaling)
    if not torch.isfinite(w).all():
        raise UserError(f"merging gives NaN/Inf in {module}.weight: the adapter (or the base) is broken")
    stats.modules += 1
    return w


def cast_checked(name: str, t: torch.Tensor, dtype: torch.dtype, stats: MergeStats) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    amax = t.abs().max().item() if t.numel() else 0.0
    stats.abs_max = max(stats.abs_max, amax)
    if dtype == torch.float16 and amax > FP16_MAX:
        raise UserError(f"{name} has values up to {amax:.4g}, beyond float16's range ({FP16_MAX:.0f}): a float16 "
                        "checkpoint would hold Inf. Use --dtype bfloat16 (or float32).")
    return t.to(dtype)


def stream_merge(base: BaseCheckpoint, adapter: Adapter, out_dir: Path, dtype: torch.dtype, into: str,
                 max_shard_bytes: int) -> tuple[MergeStats, list[str]]:
    stats = MergeStats(factor_tol=factor_tolerance(adapter))
    adapted = {f"{m}.weight": m for m in adapter.modules}
    missing = sorted(k for k in list(adapted) + list(adapter.replaced) if k not in base.meta)
    if missing:
        raise UserError(f"the adapter does not fit this base model: it adapts {len(missing)} weight(s) the base "
                        f"checkpoint {base.dir} does not have, e.g. {missing[:3]}. Pass the right --base.")
    part_shapes = adapter_shapes(adapter)
    for key, module in adapted.items():
        check_shapes(module, base.meta[key][1], adapter, part_shapes[module])
    for key, akey in adapter.replaced.items():
        if tuple(part_shapes["__replaced__"][akey]) != base.meta[key][1]:
            raise UserError(f"the adapter's saved '{key}' has shape {part_shapes['__replaced__'][akey]}, the base's "
                            f"is {base.meta[key][1]}: the adapter was made for another model")
    # Check the fingerprint on one layer before writing anything (every layer is checked again as it is merged).
    first = next(iter(adapted))
    merge_weight(adapted[first], base.get(first), adapter, into, MergeStats(factor_tol=stats.factor_tol))

    entries = []
    for key in base.keys():
        src_dtype, shape = base.meta[key]
        entries.append(Entry(key, dtype if src_dtype.is_floating_point else src_dtype, shape))
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    bar = tqdm(total=len(entries), desc="merging", unit="tensor")
    for shard, fname in zip(shards, names):
        writer = ShardWriter(out_dir / fname, shard)
        for e in shard:
            t = base.get(e.name)
            w0 = t if e.name in adapted else None
            if e.name in adapted:
                t = merge_weight(adapted[e.name], t, adapter, into, stats)
            elif e.name in adapter.replaced:
                t = adapter.load(adapter.replaced[e.name])
            t = cast_checked(e.name, t, e.dtype, stats)
            if w0 is not None:
                stats.changed += int(not torch.equal(t, w0.to(e.dtype)))
            writer.write(e.name, t)
            stats.tensors += 1
            del t
            bar.update(1)
        writer.close()
        logger.debug("wrote %s", fname)
    bar.close()
    write_index(out_dir, shards)
    return stats, names


def adapter_shapes(adapter: Adapter) -> dict:
    """module -> part -> shape, read from the file header (no tensor data); modules_to_save under '__replaced__'."""
    if adapter.tensor_file.suffix == ".safetensors":
        from .st_io import _header

        header = {k: tuple(v["shape"]) for k, v in _header(adapter.tensor_file).items()}
    else:
        from .adapter import _bin_state

        header = {k: tuple(v.shape) for k, v in _bin_state(adapter.tensor_file).items()}
    out = {m: {p: header[k] for p, k in parts.items()} for m, parts in adapter.modules.items()}
    out["__replaced__"] = {k: header[k] for k in adapter.replaced.values()}
    return out


def memory_merge(model, adapter: Adapter, dtype: torch.dtype, into: str) -> MergeStats:
    """Merge into a loaded (fp32) transformers model in place: for bases only transformers can read (GGUF, .bin)."""
    stats = MergeStats(factor_tol=factor_tolerance(adapter), formula_max_rel=0.0)
    params = dict(model.named_parameters())
    part_shapes = adapter_shapes(adapter)
    for module in adapter.modules:
        if f"{module}.weight" not in params:
            raise UserError(f"the adapter does not fit this base model: it adapts '{module}', which the base does "
                            "not have. Pass the right --base.")
        check_shapes(module, tuple(params[f"{module}.weight"].shape), adapter, part_shapes[module])
    for module in tqdm(adapter.modules, desc="merging", unit="module"):
        p = params[f"{module}.weight"]
        w0 = p.data
        merged = merge_weight(module, w0, adapter, into, stats)
        stats.changed += int(not torch.equal(merged.to(dtype), w0.to(dtype)))
        # the float64 formula from the saved files, on the weight as it will be written
        stats.formula_max_rel = max(stats.formula_max_rel, formula_residual(f"{module}.weight", w0, merged.to(dtype),
                                                                            adapter, module, into))
        p.data = merged
    for key, akey in adapter.replaced.items():
        params[key].data = adapter.load(akey)
    for name, p in model.named_parameters():
        p.data = cast_checked(name, p.data, dtype, stats)
        stats.tensors += 1
    return stats


def peft_merge(model, adapter: Adapter, dtype: torch.dtype) -> tuple:
    """A plain PEFT LoRA/DoRA adapter: PEFT's own merge_and_unload (loads the whole model)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from .adapter import _tensor_keys

    before = {n: p.detach().to(dtype).sum(dtype=torch.float64).item() for n, p in model.named_parameters()}
    peft_model = PeftModel.from_pretrained(model, str(adapter.dir))
    unused = sorted(set(_tensor_keys(adapter.tensor_file)) - set(get_peft_model_state_dict(peft_model)))
    if unused:
        raise UserError(f"PEFT did not use {len(unused)} tensor(s) of {adapter.tensor_file}, e.g. {unused[:2]}: the "
                        "adapter does not fit this base or its adapter_config.json. Nothing was written")
    merged = peft_model.merge_and_unload()
    stats = MergeStats()
    for name, p in merged.named_parameters():
        p.data = cast_checked(name, p.data, dtype, stats)
        stats.tensors += 1
        stats.changed += int(name in before and p.data.sum(dtype=torch.float64).item() != before[name])
    stats.modules = -1  # not counted by PEFT
    return merged, stats
