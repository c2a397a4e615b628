"""Checks of a merge that do not trust the adapter as loaded: they read the saved files and redo the math.

- `check_out_dir`: --out never replaces a run, a base model or the adapter being read; --overwrite replaces only a
  previous merge output (a dir with merge_report.json).
- `clean_stale_partials`: hidden work dirs left by killed merges are removed (their pid is gone) or reported.
- `check_factors`: the saved EDoRA row norms and SVD factors match this base weight (Bᵀ W0 Aᵀ = A Aᵀ), a
  fingerprint of the base the adapter was trained on that equal row norms or 10% noise cannot pass.
- `check_formula`: the written merged weights equal (m / n) ⊙_row (W0 + s·B R A), recomputed in float64 from the
  saved files (the first rows of every adapted weight).
- `adapter_is_trained`: whether the file holds a trained adapter, so that a merge changing nothing is an error.
- `base_fingerprint`: a hash of the first rows of every adapted base weight, saved by training in edora_meta.json
  and checked by the merge (for every adapter type, LoRA included: it carries no fingerprint of its own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from pipeline.edora import terms
from pipeline.errors import UserError
from pipeline.runstate import pid_alive

logger = logging.getLogger(__name__)

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "trainer_state.json", "adapter")
# Max ||Bᵀ W0 Aᵀ - A Aᵀ||_F / ||A Aᵀ||_F by the dtype the factors were saved in: float rounding of A and B only.
# Measured, worst over layers (tiny test Llama r = 4 / real SmolLM2-135M r = 32, 210 layers): the right base 1.2e-6 /
# 1.1e-6 with fp32 factors, 9.6e-4 / 1.5e-3 with bf16 ones; SmolLM2 rounded to bf16 (trained in bf16 from fp32
# files) 2.9e-4; a base with 10% Gaussian noise at least 6.4e-3 / 2.9e-3; other weights with equal row norms 0.94.
FACTOR_TOL = {"F32": 1e-3, "BF16": 3e-3, "F16": 1e-3}
# Max relative row-norm difference, by the dtype the norms were saved in: training saves ||W0_i||² in fp32 from the
# weight it loaded, and the same checkpoint read again gives the same norms up to summation order; a 16-bit save
# rounds them. SmolLM2-135M: right base 1.1e-7 (fp32) / 2.0e-3 (bf16), bf16-rounded base 4.9e-4, 10% noise >= 1.2e-2.
ROW_NORM_TOL = {"F32": 1e-3, "BF16": 8e-3, "F16": 2e-3}
# Max |written - float64 formula| / max |formula| per output dtype: its rounding (2^-8 bf16, 2^-11 fp16) plus margin.
FORMULA_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}
FORMULA_ROWS = 64


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_out_dir(out: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse an --out that is, holds or sits inside anything in `protected` (label -> path) or a run dir; with
    --overwrite replace only a previous merge output."""
    o = out.expanduser().resolve()
    for label, p in protected.items():
        p = p.expanduser().resolve()
        if _inside(o, p) or _inside(p, o):
            raise UserError(f"--out {out} {'is inside' if _inside(o, p) and o != p else 'would replace'} the "
                            f"{label} {p}; choose another output dir (default: 'merged' beside the adapter)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marks = [m for m in RUN_MARKERS if (out / m).exists()] + [p.name for p in out.glob("checkpoint-*")][:1]
    if marks:
        raise UserError(f"--out {out} holds a training run ({', '.join(marks)}); merge never writes over a run. "
                        "Choose another --out, e.g. RUN/merged")
    if not overwrite:
        raise UserError(f"output dir {out} exists and is not empty; pass --overwrite to replace it, or choose "
                        "another --out")
    if not (out / "merge_report.json").is_file():
        raise UserError(f"--out {out} is not a previous merge output (no merge_report.json): --overwrite replaces "
                        "only those. Choose another --out, or move that dir away yourself")


def clean_stale_partials(out: Path) -> list[str]:
    """Remove `.<out>.partial-<pid>` / `.<out>.old-<pid>` dirs whose merge process is gone; report live ones."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    removed = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and pid_alive(pid):
            logger.warning("%s belongs to a merge still running (pid %d); left alone", p, pid)
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        logger.warning("removed %s (%.1f MB) left by a merge that was killed (pid %d)", p, size / 1e6, pid)
        removed.append(p.name)
    return removed


def factor_residual(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, svd_target: str) -> float:
    """||Bᵀ T Aᵀ - A Aᵀ||_F / ||A Aᵀ||_F with T = W0 (or its row-normalised direction): 0 up to rounding for the base
    the factors were computed from. With A = Σ Vᵀ, B = U of a truncated SVD of T (exact, or randomized on either
    side), Bᵀ T V = Σ holds exactly, hence Bᵀ T Aᵀ = Σ² = A Aᵀ."""
    t = w0.double()
    if svd_target == "direction":
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = terms.gram(a, torch.float64)
    return ((b.double().T @ terms.projection(t, a, torch.float64) - g).norm() / g.norm().clamp_min(1e-300)).item()


def row_norm_residual(w0: torch.Tensor, row_norm2: torch.Tensor) -> float:
    """Largest relative difference between this weight's row norms and the ones saved at training."""
    saved = row_norm2.double().sqrt()
    return ((terms.row_norm2(w0, torch.float64).sqrt() - saved).abs() / saved.clamp_min(1e-300)).max().item()


def check_factors(module: str, w0: torch.Tensor, f: dict, adapter, tol: dict) -> float:
    """The base fingerprint: row norms and SVD factors saved at training must match this weight (the weight
    training saw: dequantized for a 4-bit-trained adapter). Returns the worse of the two residuals."""
    rel = factor_residual(w0, f["edora_A"], f["edora_B"], adapter.config.get("svd_target") or "weight")
    norms = row_norm_residual(w0, f["edora_row_norm2"])
    if not (rel <= tol["factors"] and norms <= tol["row_norms"]):
        raise UserError(f"the adapter was made on a different base model: {module}.weight does not match the "
                        f"fingerprint saved at training (SVD factors: ||Bᵀ W0 Aᵀ - A Aᵀ|| / ||A Aᵀ|| = {rel:.3g}, "
                        f"tolerance {tol['factors']:g}; row norms: up to {norms:.3g} off, tolerance {tol['row_norms']:g}). Pass the "
                        "base it was trained on with --base (adapter_config.json says "
                        f"{adapter.config.get('base_model_name_or_path')!r})")
    return max(rel, norms)


def factor_tolerance(adapter) -> dict:
    """Tolerances of check_factors for the dtypes the factors and norms were saved in (the loosest wins)."""
    from .st_io import _header

    if adapter.tensor_file.suffix != ".safetensors":
        return {"factors": FACTOR_TOL["F32"], "row_norms": ROW_NORM_TOL["F32"]}
    header = _header(adapter.tensor_file)

    def dtypes(names):
        return {header[k]["dtype"] for parts in adapter.modules.values() for p, k in parts.items() if p in names}

    return {"factors": max(FACTOR_TOL.get(d, FACTOR_TOL["BF16"]) for d in dtypes(("edora_A", "edora_B"))),
            "row_norms": max(ROW_NORM_TOL.get(d, ROW_NORM_TOL["BF16"]) for d in dtypes(("edora_row_norm2",)))}


@torch.no_grad()
def formula_rows(w0_rows: torch.Tensor, f: dict, scaling: float, use_magnitude: bool,
                 rows: slice) -> torch.Tensor:
    """(m / n) ⊙_row (W0 + s·B R A) for some rows, in float64 (a row's norm needs only that row)."""
    # written out here, not terms.merged_weight: this checks the merge's output, so it must not share its code
    w = w0_rows.double() + scaling * (f["edora_B"][rows].double() @ f["edora_R"].double() @ f["edora_A"].double())
    if not use_magnitude:
        return w
    return w * (f["edora_magnitude"][rows].double() / w.norm(dim=1))[:, None]


@torch.no_grad()
def formula_residual(key: str, w0: torch.Tensor, got: torch.Tensor, adapter, module: str, into: str) -> float:
    """Relative difference between the first rows of a written merged weight and the float64 formula from the
    saved factors and the base weight `w0` (as stored); UserError above the written dtype's rounding."""
    from .quant import dequantized_4bit

    rows = slice(0, min(FORMULA_ROWS, got.shape[0]))
    w0 = w0[rows] if into != "dequantized" else dequantized_4bit(w0.float(), adapter.quant)[rows]
    want = formula_rows(w0, adapter.factors(module), adapter.scaling, adapter.use_magnitude, rows)
    rel = ((got[rows].double() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
    if not rel <= FORMULA_TOL[got.dtype]:
        raise UserError(f"the written {key} differs from (m / n)·(W0 + s·B R A) recomputed from the saved adapter "
                        f"by {rel:.3g} of its largest value (tolerance {FORMULA_TOL[got.dtype]:g} for "
                        f"{got.dtype}): the merge is wrong; nothing was published")
    return rel


@torch.no_grad()
def check_formula(out_dir: Path, base, adapter, into: str) -> float:
    """Worst formula_residual over every adapted weight written to out_dir (read back from the shards)."""
    from .st_io import BaseCheckpoint

    merged = BaseCheckpoint(out_dir)
    worst = 0.0
    for module in adapter.modules:
        key = f"{module}.weight"
        rows = FORMULA_ROWS if into != "dequantized" else None  # a 4-bit round trip needs the whole weight
        w0 = base.head(key, rows) if rows else base.get(key)
        worst = max(worst, formula_residual(key, w0, merged.head(key, FORMULA_ROWS), adapter, module, into))
    return worst


def adapter_is_trained(adapter) -> bool:
    """R moved past its random init (100x init_sigma) or m off the base row norms, for EDoRA; a non-zero lora_B
    (PEFT initialises it to zero) for LoRA/DoRA."""
    if adapter.peft_type == "EDORA":
        sigma = float(adapter.config.get("init_sigma") or 1e-5)
        for module in adapter.modules:
            f = adapter.factors(module)
            if f["edora_R"].abs().max().item() > 100 * sigma:
                return True
            if "edora_magnitude" in f:
                norm = f["edora_row_norm2"].sqrt()
                if ((f["edora_magnitude"] - norm).abs() / norm.clamp_min(1e-30)).max().item() > 1e-4:
                    return True
        return False
    from .adapter import _tensor_keys

    return any(".lora_B" in k and adapter.load(k).abs().max().item() > 0 for k in _tensor_keys(adapter.tensor_file))


FINGERPRINT_ROWS = 8


def adapted_weight_names(keys: list[str]) -> list[str]:
    """Base weight names an adapter file adapts ('model.layers.0.self_attn.q_proj.weight'), from its tensor keys."""
    from .adapter import PREFIX
    from .st_io import natural_key

    names = set()
    for key in keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for marker in (".lora_A.", ".edora_A"):
            if marker in name:
                names.add(name.split(marker)[0] + ".weight")
    return sorted(names, key=natural_key)


def base_fingerprint(base_dir: Path, names: list[str]) -> str:
    """sha256 of the first FINGERPRINT_ROWS rows (as fp32) of each named weight of a safetensors checkpoint."""
    from .st_io import BaseCheckpoint

    base = BaseCheckpoint(base_dir)
    h = hashlib.sha256()
    for name in names:
        if name not in base.files:
            h.update(f"{name}: missing".encode())
            continue
        h.update(name.encode() + b"\0" + base.head(name, FINGERPRINT_ROWS).float().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def local_safetensors_dir(spec: str) -> Path | None:
    """The local safetensors dir of a base spec without any download (a hub id: the cached copy), else None."""
    from pipeline.specs import ModelSpec

    model = ModelSpec(spec, "missing") if spec.startswith("pkg://") else ModelSpec.parse(spec)
    p = model.path
    if not (model.kind == "dir" and p.is_dir()):
        if not model.is_org_name:
            return None
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(spec, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not cached: no fingerprint, said so in the meta
            return None
    has = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    return p if has else None


def training_fingerprint(spec: str, tensor_file: Path) -> str | None:
    """What training records in edora_meta.json: the base fingerprint over the weights its adapter adapts."""
    from .adapter import _tensor_keys

    base_dir = local_safetensors_dir(spec)
    return base_fingerprint(base_dir, adapted_weight_names(_tensor_keys(tensor_file))) if base_dir else None


def check_base_fingerprint(adapter, base_dir: Path | None) -> dict:
    """Compare the fingerprint training saved (edora_meta.json) with this base; UserError when they differ."""
    from .adapter import META_FILE, AdapterMeta, _tensor_keys

    meta_path = adapter.dir / META_FILE
    meta = AdapterMeta.read(adapter.dir)
    saved = meta.base_fingerprint if meta is not None else None
    if saved is None or base_dir is None:
        return {"saved": saved, "checked": False}
    now = base_fingerprint(base_dir, adapted_weight_names(_tensor_keys(adapter.tensor_file)))
    if now != saved:
        raise UserError(f"the adapter was made on a different base model: the base weights it adapts differ from the "
                        f"ones recorded at training ({meta_path}: base_fingerprint {saved}, this base {now}). Pass "
                        f"the base it was trained on with --base ({meta_path.name} says {meta.base_model!r})")
    return {"saved": saved, "checked": True}
