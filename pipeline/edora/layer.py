"""The EDoRA layer: wraps a Linear (or a bitsandbytes 4-bit Linear) and adds R and m.

Forward, per adapted layer, with s = lora_alpha / r:

    y = (m / n) ⊙ (x W0ᵀ + s·(x Aᵀ)(B R)ᵀ) + bias,   n_i = ||(W0 + s·B R A)[i, :]||  (detached, DoRA §4.3)

computed by `ops.EdoraLinearAdapter` (one autograd node): the base layer's output is reused (no second base matmul
unless dropout is active) and `W0 + s·B R A` is never built. The row norm comes from terms precomputed once from W0
(P = W0 Aᵀ, G = A Aᵀ, w_i² = ||W0[i, :]||²):

    n_i² = w_i² + 2s·Σ_j P_ij (BR)_ij + s²·Σ_j ((BR) G)_ij (BR)_ij

so a step costs O(out·r²) extra and never dequantizes a 4-bit weight or gathers a ZeRO-3-partitioned one.
In training the per-step terms (B R, n, m / n) of all layers are computed together (step_terms.py) and each layer
runs only `ops.EdoraApply`; this per-layer op serves everything else.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.integrations import gather_params_ctx
from torch import nn

from . import terms
from .config import EdoraConfig
from .ops import EdoraApply, EdoraLinearAdapter, MagnitudeLowRank, factored_row_norm, no_autocast
from .svd import truncated_svd

_TINY = torch.finfo(torch.float32).tiny


def _unpack_bnb_cpu_weight(base: nn.Module) -> None:
    # On AVX512-BF16 CPUs bnb 0.50 repacks 4-bit weights for its own kernel at the first eval forward; the packed
    # layout cannot be dequantized and bnb's inverse is lossy. EDoRA needs W0 again (merge, load checks), so adapted
    # layers opt out of the repacking; a layer already repacked is restored with bnb's inverse, with a warning.
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
    state = getattr(base.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        warnings.warn("this 4-bit layer was repacked by bitsandbytes' CPU kernel before EDoRA wrapped it; its "
                      "dequantized weight is approximate. Add the adapter before running the model on CPU.", stacklevel=2)
        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(base.weight.data, state)


class EdoraLayer(BaseTunerLayer):
    adapter_layer_names = ("edora_R", "edora_magnitude")
    other_param_names = ("edora_A", "edora_B", "edora_row_norm2", "edora_P", "edora_G", "edora_dropout",
                         "r", "scaling", "use_magnitude", "fingerprint_rtol")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.use_magnitude: dict[str, bool] = {}
        self.fingerprint_rtol: dict[str, float] = {}
        self.edora_dropout = nn.ModuleDict({})
        self.edora_R = nn.ParameterDict({})
        self.edora_magnitude = nn.ParameterDict({})
        # Saved with the adapter: reload never re-runs the SVD; row norms double as the base's fingerprint.
        self.edora_A = BufferDict({}, persistent=True)
        self.edora_B = BufferDict({}, persistent=True)
        self.edora_row_norm2 = BufferDict({}, persistent=True)
        # Derived from W0 and A; recomputed after every load instead of stored.
        self.edora_P = BufferDict({}, persistent=False)
        self.edora_G = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._refresh_on_load: set[str] = set()
        self._merge_norms: dict[str, torch.Tensor] = {}  # n used by merge(), needed to unmerge exactly
        self._a_cache: dict = {}  # A in the compute dtype: A is frozen, so cast it once, not every step
        self._edora_step = None  # this step's batched terms (step_terms.py), set by the EdoraModel hook
        self._edora_cdt: Optional[torch.dtype] = None  # compute dtype seen by the last forward
        base = self.get_base_layer()
        _unpack_bnb_cpu_weight(base)
        if isinstance(base, nn.Linear) or self.quantization_backend is not None:
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"EDoRA adapts nn.Linear layers (optionally bitsandbytes-quantized), not {type(base)}")
        self.kwargs = kwargs

    # ---- creation ---------------------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: EdoraConfig, layer_seed: int = 0,
                     inference_mode: bool = False, svd_here: bool = True) -> None:
        r = config.r
        if not 1 <= r <= min(self.in_features, self.out_features):
            raise ValueError(
                f"EDoRA rank r={r} must be between 1 and min(in, out) = {min(self.in_features, self.out_features)} "
                f"for a layer of shape [{self.out_features}, {self.in_features}]; lower r or exclude this module"
            )
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.use_magnitude[adapter_name] = config.use_magnitude
        self.fingerprint_rtol[adapter_name] = config.fingerprint_rtol
        self.edora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dtype = getattr(torch, config.adapter_dtype)
        device = self._base_device()
        if device.type == "meta" or not config.init_weights:
            # Loading a saved adapter: allocate; A, B, m, R and the row norms come from the file, and the derived
            # terms are computed by the load hook. Nothing touches W0 here, so creation is instant.
            self._set_tensors(adapter_name, device, dtype,
                              a=torch.zeros(r, self.in_features), b=torch.zeros(self.out_features, r),
                              w2=torch.ones(self.out_features), p=torch.zeros(self.out_features, r),
                              r_init=torch.zeros(r, r), m=torch.ones(self.out_features))
        else:
            self._init_from_base(adapter_name, config, layer_seed, dtype, svd_here)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _base_device(self) -> torch.device:
        w = self.get_base_layer().weight
        return w.device

    def _base_weight_fp32(self) -> torch.Tensor:
        """W0 as a fresh fp32 tensor: dequantized for 4-bit layers, gathered under ZeRO-3."""
        base = self.get_base_layer()  # (bnb's CPU repacking was switched off in __init__)
        with gather_params_ctx(base.weight, modifier_rank=None):
            if self.quantization_backend is not None:
                w = self.quantization_backend.get_base_weight(base)
            else:
                w = base.weight
            w = w.detach().to(torch.float32).clone()
        if w.shape != (self.out_features, self.in_features):
            raise RuntimeError(f"base weight has shape {tuple(w.shape)}, expected "
                               f"{(self.out_features, self.in_features)}")
        return w

    def _init_from_base(self, adapter_name: str, config: EdoraConfig, layer_seed: int, dtype: torch.dtype,
                        svd_here: bool = True) -> None:
        """SVD init from W0. svd_here=False (another rank's share under ZeRO-3): A, B and P stay zero until
        `broadcast_factors` fills them from the rank that computed them; m, R and the row norms are local."""
        w0 = self._base_weight_fp32()
        if not torch.isfinite(w0).all():
            raise ValueError(f"the base weight of this layer [{self.out_features}, {self.in_features}] has NaN/Inf "
                             "values; EDoRA cannot factorise it (check the checkpoint or its dtype)")
        r = config.r
        w2 = terms.row_norm2(w0)
        gen = torch.Generator(device="cpu").manual_seed(layer_seed)
        r_init = torch.randn(r, r, generator=gen) * config.init_sigma
        if not svd_here:
            zeros = dict(a=torch.zeros(r, self.in_features), b=torch.zeros(self.out_features, r),
                         p=torch.zeros(self.out_features, r))
            self._set_tensors(adapter_name, w0.device, dtype, w2=w2, r_init=r_init, m=w2.sqrt(), **zeros)
            return
        target = w0
        if config.svd_target == "direction":
            target = w0 / w2.sqrt().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        u, s, vh = truncated_svd(target, r, config.svd_method, config.svd_niter, config.svd_oversample,
                                 seed=layer_seed)
        if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
            raise ValueError("the SVD of this layer's weight returned NaN/Inf; try svd_method='exact'")
        b = u                      # [out, r]
        a = s[:, None] * vh        # [r, in]: Σ folded into A (LoRA-XS convention, the authors' code)
        p = terms.projection(w0, a)
        self._set_tensors(adapter_name, w0.device, dtype, a=a, b=b, w2=w2, p=p, r_init=r_init, m=w2.sqrt())

    def _set_tensors(self, name, device, dtype, *, a, b, w2, p, r_init, m) -> None:
        def put(t):
            return t.to(device=device, dtype=dtype)

        self.edora_A[name] = put(a)
        self.edora_B[name] = put(b)
        # clamped above 0 so m / n stays finite for an all-zero weight row
        self.edora_row_norm2[name] = w2.to(device=device, dtype=torch.float32).clamp_min(_TINY)
        self.edora_P[name] = p.to(device=device, dtype=torch.float32)
        self.edora_G[name] = terms.gram(a.to(device))
        self.edora_R[name] = nn.Parameter(put(r_init))
        if self.use_magnitude[name]:
            self.edora_magnitude[name] = nn.Parameter(put(m))

    @torch.no_grad()
    def broadcast_factors(self, name: str, src: int) -> None:
        """Receive (or send, on rank `src`) A, B and P, computed by one rank, then derive G locally."""
        import torch.distributed as dist

        for store in (self.edora_A, self.edora_B, self.edora_P):
            t = store[name].contiguous()
            dist.broadcast(t, src=src)
            store[name] = t
        self.edora_G[name] = terms.gram(self.edora_A[name])

    # ---- loading: recompute derived terms and check the base ----------------------------------------------------

    def _edora_load_pre_hook(self, state_dict, prefix, *args):
        for name in self.edora_A:
            incoming = state_dict.get(f"{prefix}edora_A.{name}")
            # a shape mismatch is reported by load_state_dict itself; nothing to refresh then
            if incoming is not None and incoming.shape == self.edora_A[name].shape:
                self._refresh_on_load.add(name)
            else:
                self._refresh_on_load.discard(name)

    def _edora_load_post_hook(self, module, incompatible_keys):
        if not self._refresh_on_load:
            return
        names, self._refresh_on_load = sorted(self._refresh_on_load), set()
        w0 = self._base_weight_fp32()
        w2_base = terms.row_norm2(w0)
        for name in names:
            rel = terms.fingerprint_deviation(self.edora_row_norm2[name], w2_base)
            if not rel <= self.fingerprint_rtol[name]:
                raise ValueError(
                    f"EDoRA adapter '{name}' was made on a different base model: the row norms of this "
                    f"[{self.out_features}, {self.in_features}] weight differ from the saved ones by {rel:.2%} "
                    f"(median, tolerance {self.fingerprint_rtol[name]:.2%}). Load the base model the adapter was "
                    "trained on (see base_model_name_or_path in adapter_config.json)."
                )
            dev = self.edora_A[name].device
            self.edora_row_norm2[name] = w2_base.to(dev).clamp_min(_TINY)
            self.edora_P[name] = terms.projection(w0, self.edora_A[name]).to(dev)
            self.edora_G[name] = terms.gram(self.edora_A[name])

    # ---- math -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self, name: str, w0: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', n): the adapted weight in fp32 and the row norm used (ones for LoRA-XS). n is computed directly
        from `w0` (default: this layer's base weight, dequantized), as the merge formula says."""
        w0 = self._base_weight_fp32() if w0 is None else w0
        m = self.edora_magnitude[name] if self.use_magnitude[name] else None
        return terms.merged_weight(w0, self.edora_A[name], self.edora_B[name], self.edora_R[name], m,
                                   self.scaling[name])

    def _a_in(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        a = self.edora_A[name]
        if a.dtype == dtype or torch.compiler.is_compiling():
            return a.to(dtype)
        stamp = (a.data_ptr(), a._version, a.device)
        hit = self._a_cache.get((name, dtype))
        if hit is None or hit[0] != stamp:
            hit = (stamp, a.to(dtype))
            self._a_cache[(name, dtype)] = hit
        return hit[1]

    def fusable(self, name: str) -> bool:
        """The fused paths (the per-layer EdoraLinearAdapter and the training fast path of step_terms.py) need a
        magnitude, no bias and no active dropout on the adapter path."""
        return (self.use_magnitude[name] and getattr(self.get_base_layer(), "bias", None) is None
                and (isinstance(self.edora_dropout[name], nn.Identity) or not self.training))

    def _edora_output(self, x: torch.Tensor, base_out: torch.Tensor, name: str) -> torch.Tensor:
        cdt = base_out.dtype
        self._edora_cdt = cdt
        dropout = self.edora_dropout[name]
        if self.fusable(name):
            # the hot path (Llama/Mistral projections have no bias): one fused autograd node
            shape = base_out.shape
            y = EdoraLinearAdapter.apply(x.reshape(-1, x.shape[-1]).to(cdt), base_out.reshape(-1, shape[-1]),
                                         self._a_in(name, cdt), self.edora_B[name].float(),
                                         self.edora_R[name].float(), self.edora_magnitude[name].float(),
                                         # .float(): no-ops, unless someone cast the whole model (.to(dtype))
                                         self.edora_row_norm2[name].float(), self.edora_P[name].float(),
                                         self.edora_G[name].float(),
                                         self.scaling[name])
            return y.view(shape)
        x_in = dropout(x)
        xa = F.linear(x_in.to(cdt), self._a_in(name, cdt))  # [..., r]
        s = self.scaling[name]
        with no_autocast(base_out.device):
            br = self.edora_B[name].float() @ self.edora_R[name].float()  # [out, r], fp32, grad to R
        shape = base_out.shape
        base2d, xa2d = base_out.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1])
        if not self.use_magnitude[name]:
            return torch.addmm(base2d, xa2d, br.to(cdt).T, alpha=s).view(shape)
        n = factored_row_norm(self.edora_row_norm2[name].float(), self.edora_P[name].float(),
                              self.edora_G[name].float(), br.detach(), s)
        m = self.edora_magnitude[name].float()
        bias = self.get_base_layer().bias
        if isinstance(dropout, nn.Identity) or not self.training:
            # base output reused: x W0ᵀ = base_out - bias
            if bias is None:
                return MagnitudeLowRank.apply(base2d, xa2d, br, m, n, s).view(shape)
            b = bias.to(cdt)
            return (MagnitudeLowRank.apply(base2d - b, xa2d, br, m, n, s) + b).view(shape)
        # Dropout on the adapter path: the decomposed part sees dropout(x), as PEFT's DoRA does.
        scale = (m / n).to(cdt)
        base_drop = self.get_base_layer()(x_in)
        if bias is not None:
            base_drop = base_drop - bias.to(cdt)
        out = base_out + (scale - 1) * base_drop
        m_br = (br * (s * m / n)[:, None]).to(cdt)
        return torch.addmm(out.reshape(-1, shape[-1]), xa2d, m_br.T).view(shape)


def _load_pre_hook(module: Linear, state_dict, prefix, *args) -> None:
    module._edora_load_pre_hook(state_dict, prefix, *args)


def _load_post_hook(module: Linear, incompatible_keys) -> None:
    module._edora_load_post_hook(module, incompatible_keys)


class Linear(nn.Module, EdoraLayer):
    """EDoRA on a dense (or bitsandbytes-quantized) linear layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: EdoraConfig, layer_seed: int = 0,
                 svd_here: bool = True, **kwargs) -> None:
        super().__init__()
        EdoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_seed=layer_seed, svd_here=svd_here)
        # plain functions, not bound methods: a module holding hooks bound to itself is a reference cycle, and a
        # deleted model would keep its (GPU) memory until the next garbage collection
        self._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        self.register_load_state_dict_post_hook(_load_post_hook)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.edora_R:
                continue
            base = self.get_base_layer()
            w_new, n = self.merged_weight(name)
            if safe_merge and not torch.isfinite(w_new).all():
                raise ValueError(f"merging EDoRA adapter '{name}' gives NaN/Inf weights; the adapter is broken")
            self._merge_norms[name] = n
            if self.quantization_backend is not None:
                self.set_base_weight(w_new)
            else:
                base.weight.data = w_new.to(base.weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.edora_R:
                continue
            n = self._merge_norms.pop(name)
            m = self.edora_magnitude[name].detach() if self.use_magnitude[name] else None
            w = terms.base_from_merged(self._base_weight_fp32(), self.edora_A[name], self.edora_B[name],
                                       self.edora_R[name].detach(), m, n, self.scaling[name])
            if self.quantization_backend is not None:
                self.set_base_weight(w)
            else:
                self.get_base_layer().weight.data = w.to(self.get_base_layer().weight.dtype)

    @staticmethod
    def _plain_base(base: nn.Module, x: torch.Tensor, cdt: torch.dtype) -> bool:
        # the base matmul can join the adapter's node when nothing hooks or replaces the Linear's forward
        # Autocast (the Trainer's bf16 mode) changes nothing when input and weight are already in its dtype.
        dev = x.device.type
        return (type(base) is nn.Linear and x.dtype == cdt and base.weight.dtype == cdt
                and not base.weight.requires_grad and not base._forward_hooks and not base._forward_pre_hooks
                and "forward" not in base.__dict__
                and (not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) == cdt))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        step = self._edora_step
        if step is not None and torch.is_grad_enabled() and step.usable():
            # training fast path: B R, n and m / n of this layer were computed with all the others (step_terms.py)
            base, cdt, a_c = self.base_layer, step.cdt, step.a_c
            if self._plain_base(base, x, cdt) and not args and not kwargs:
                y = EdoraApply.apply(x.reshape(-1, x.shape[-1]), None, base.weight, a_c, step.br_s, step.scale,
                                     step.scale_c)
                return y.view(*x.shape[:-1], y.shape[-1])
            result = base(x, *args, **kwargs)
            if self.quantization_backend is not None:
                result = self.quantization_backend.maybe_clone_base_result(result)
            if result.dtype == cdt:
                shape = result.shape
                y = EdoraApply.apply(x.reshape(-1, x.shape[-1]).to(cdt), result.reshape(-1, shape[-1]), None, a_c,
                                     step.br_s, step.scale, step.scale_c)
                return y.view(shape)
        else:
            result = self.base_layer(x, *args, **kwargs)
            if self.quantization_backend is not None:
                result = self.quantization_backend.maybe_clone_base_result(result)
        for name in self.active_adapters:
            if name in self.edora_R:
                result = self._edora_output(x, result, name)
        return result

    def __repr__(self) -> str:
        return "edora." + super().__repr__()


def layer_seed(config_seed: Optional[int], key: str) -> int:
    """A per-layer seed that is the same on every rank and every run with the same config."""
    base = 0 if config_seed is None else int(config_seed)
    return (base * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)
