"""Training fast path: the per-step parameter terms of every EDoRA layer in a few batched kernels.

At small batches a training step is bound by kernel launches, not by the GPU (benchmarks/results/step_time.md):
per layer the fused op still computes B R, the row norm and m / n on its own, ~20 small kernels per adapted layer.
Before each training forward, a hook on the EdoraModel computes s·B R, the detached norm n and m / n for all layers
at once (`ops.EdoraStepTerms`, layers grouped by shape), and each layer then runs only x Aᵀ, one addmm and one
scale (`ops.EdoraApply`): 3 kernels forward and 6 backward, about what a LoRA layer costs.

The frozen per-layer buffers B, P, G and the squared row norms of a group are stacked into one tensor each and the
layers keep views of it, so nothing is stored twice. Anything that replaces a layer's buffer (loading an adapter,
`.to()`) breaks a view; the group is then rebuilt at the next step.

Used only where it computes exactly what the per-layer path does: training mode with gradients on, one active
adapter, fp32 adapter tensors, magnitude on, no bias, no dropout, and neither DeepSpeed ZeRO-3 (partitioned
parameters) nor reentrant activation checkpointing (it would backward through the shared terms once per layer).
Everything else runs the per-layer path, as does the first step on a base other than a plain Linear (it learns
the compute dtype). Under torch.compile the hook runs eagerly (outside the graph) and the batched terms enter the
compiled graph as inputs: one graph, no per-layer norm kernels in it, and no recompile per step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import nn

from .ops import EdoraStepTerms

_STACKED = ("edora_B", "edora_P", "edora_G", "edora_row_norm2")


class LayerStep(NamedTuple):
    """What one layer needs from this step's batched terms (set on the layer by the hook)."""
    name: str
    br_s: torch.Tensor
    scale: torch.Tensor
    scale_c: torch.Tensor
    a_c: torch.Tensor  # A in the compute dtype, cast here (cached), not in a compiled graph: a kernel per layer saved
    cdt: torch.dtype
    r: nn.Parameter
    r_version: int
    m: nn.Parameter
    m_version: int
    live: list  # [True] until this pass's backward ran

    def usable(self) -> bool:
        if torch.compiler.is_compiling():
            # the hook ran (eagerly) right before this forward; a version check would be a guard on a number that
            # changes every step, i.e. a recompile per step
            return self.live[0]
        # in-place optimizer updates bump the versions: terms from before a step are never reused
        return self.live[0] and self.r._version == self.r_version and self.m._version == self.m_version


def _eligible(layer, name: str) -> bool:
    # the hook runs in training mode, where fusable() also rules out any adapter dropout
    return (name in layer.edora_R and layer.fusable(name)
            and layer.edora_R[name].dtype == torch.float32 and layer.edora_magnitude[name].dtype == torch.float32
            and all(getattr(layer, attr)[name].dtype == torch.float32 for attr in _STACKED)
            and not hasattr(layer.edora_R[name], "ds_id"))


class _Group:
    """Layers of one shape. What the hook reads every step is cached as plain dicts: a module attribute lookup
    costs about a microsecond, and a 7B model has 224 layers."""

    def __init__(self, layers: list, name: str) -> None:
        self.layers, self.name = layers, name
        self.s = layers[0].scaling[name]
        with torch.no_grad():
            self.stacks = {}
            for attr in _STACKED:
                stack = torch.stack([getattr(layer, attr)[name] for layer in layers])
                for i, layer in enumerate(layers):
                    getattr(layer, attr)[name] = stack[i]  # the layer's buffer becomes a view of the stack
                self.stacks[attr] = stack
        # the buffer dicts and the views they hold now: `.to()` or a reload replaces an entry
        self.views = [(buffers, buffers[name]) for layer in layers
                      for buffers in (getattr(layer, attr)._buffers for attr in _STACKED)]
        # read each step (not the tensors): loading with assign=True replaces the Parameter objects
        self.r_dicts = [layer.edora_R._parameters for layer in layers]
        self.m_dicts = [layer.edora_magnitude._parameters for layer in layers]
        bases = [layer.get_base_layer() for layer in layers]
        dtypes = {base.weight.dtype for base in bases} if all(type(b) is nn.Linear for b in bases) else set()
        self.base_dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.device_type = layers[0].edora_row_norm2[name].device.type

    def intact(self) -> bool:
        return all(buffers.get(self.name) is view for buffers, view in self.views)

    def cdt(self) -> Optional[torch.dtype]:
        learned = {layer._edora_cdt for layer in self.layers} - {None}
        if learned:  # recorded by the per-layer path
            return learned.pop() if len(learned) == 1 else None
        return self._guess_cdt()

    def _guess_cdt(self) -> Optional[torch.dtype]:
        # Before any forward: a plain Linear computes in its weight dtype, or autocast's. Guessing saves a compiled
        # model a second compilation. A wrong guess costs only speed: the layer takes the per-layer path, which
        # records the real dtype for the next step. Other bases (4-bit) are learned at the first step.
        if self.base_dtype is None or not self.base_dtype.is_floating_point:
            return None
        if torch.is_autocast_enabled(self.device_type):
            return torch.get_autocast_dtype(self.device_type)
        return self.base_dtype


class StepTermsCache:
    """Owned by an EdoraModel; `prepare` runs before every forward of the wrapped model."""

    def __init__(self) -> None:
        self.enabled = True
        self.groups: list[_Group] = []
        self.layers: Optional[list] = None  # the adapted layers, found once per injection (a model walk is slow)
        self.ckpt_modules: list = []
        self.signature: tuple = ()
        self.live = [False]

    def _signature(self, name: str) -> tuple:
        # cheap: a cast (.to) or a reload replaces buffers and may change dtypes, so eligibility is decided again
        if not self.layers or name not in self.layers[0].edora_R:
            return (name,)
        first = self.layers[0]
        return name, first.edora_R[name].dtype, first.edora_B[name].data_ptr()

    def invalidate(self) -> None:
        """Call when layers are added, removed or replaced."""
        self.layers, self.groups = None, []

    def _build(self, model: nn.Module, name: str) -> bool:
        from .layer import Linear

        self.layers = [mod for mod in model.modules() if isinstance(mod, Linear) and name in mod.edora_R]
        self.ckpt_modules = [mod for mod in model.modules() if hasattr(mod, "gradient_checkpointing")]
        self.groups = []
        if not self.layers or not all(_eligible(layer, name) for layer in self.layers):
            return False
        by_shape: dict[tuple, list] = {}
        for layer in self.layers:
            key = (layer.out_features, layer.r[name], layer.scaling[name], layer.edora_row_norm2[name].device)
            by_shape.setdefault(key, []).append(layer)
        self.groups = [_Group(group, name) for group in by_shape.values()]
        return True

    def _reentrant_checkpointing(self) -> bool:
        for mod in self.ckpt_modules:
            if mod.gradient_checkpointing is True:
                func = getattr(mod, "_gradient_checkpointing_func", None)
                kw = func.keywords if isinstance(func, functools.partial) else {}
                if kw.get("use_reentrant", True) is not False:
                    return True
        return False

    def prepare(self, model: nn.Module, active: list[str]) -> None:
        self.live[0] = False  # whatever the last pass left on the layers is spent
        if not (self.enabled and model.training and torch.is_grad_enabled() and len(active) == 1):
            return
        name = active[0]
        if self.layers is None or self._signature(name) != self.signature or not all(g.intact() for g in self.groups):
            ok = self._build(model, name)
            self.signature = self._signature(name)
            if not ok:
                return
        if not self.groups or self._reentrant_checkpointing() \
                or any(layer.merged_adapters or layer._disable_adapters for layer in self.layers):
            return
        self.live = live = [True]
        for group in self.groups:
            cdt = group.cdt()
            if cdt is None:  # the first step: the per-layer path records each layer's compute dtype
                continue
            rs = [d[name] for d in group.r_dicts]
            ms = [d[name] for d in group.m_dicts]
            st = group.stacks
            br_s, scale, scale_c = EdoraStepTerms.apply(
                torch.stack(rs), torch.stack(ms), st["edora_B"], st["edora_P"], st["edora_G"],
                st["edora_row_norm2"], group.s, cdt, live)
            for layer, r, m, b_i, s_i, c_i in zip(group.layers, rs, ms, br_s.unbind(0), scale.unbind(0),
                                                  scale_c.unbind(0)):
                # straight into __dict__: nn.Module.__setattr__ costs microseconds, paid per layer per step
                layer.__dict__["_edora_step"] = LayerStep(name, b_i, s_i, c_i, layer._a_in(name, cdt), cdt, r,
                                                          r._version, m, m._version, live)
