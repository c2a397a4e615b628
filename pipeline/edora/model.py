"""EdoraModel: PEFT's BaseTuner for EDoRA (finds target Linears, wraps them, marks R and m trainable)."""

from __future__ import annotations

import logging
import time
import weakref

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, resolve_quantization_backend
from torch import nn
from tqdm.auto import tqdm

from .config import EdoraConfig
from .layer import EdoraLayer, Linear, layer_seed
from .step_terms import StepTermsCache

logger = logging.getLogger(__name__)


class EdoraModel(BaseTuner):
    """Adds EDoRA adapters to a transformers model. Use through `peft.get_peft_model(model, EdoraConfig(...))`."""

    prefix: str = "edora_"
    tuner_layer_cls = EdoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _svd_share(self, config: EdoraConfig) -> tuple[int, int]:
        """(rank, world) when the SVDs should be split across ranks: a distributed ZeRO-3 run creating a new
        adapter. Each rank gathers every weight anyway (a collective), but computes only every world-th SVD."""
        import torch.distributed as dist
        from peft.utils.integrations import check_deepspeed_zero3_enabled

        if config.init_weights and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 \
                and check_deepspeed_zero3_enabled():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _begin_injection(self, model: nn.Module, config: EdoraConfig) -> None:
        self._rank, self._world = self._svd_share(config)
        self._pending_broadcast: list[tuple[Linear, int]] = []
        n_targets = sum(1 for key, _ in model.named_modules() if self._check_target_module_exists(config, key))
        self._progress = tqdm(total=n_targets or None, desc="EDoRA init (SVD)" if config.init_weights else
                              "EDoRA adapter layers", unit="layer", disable=n_targets < 8, leave=False)
        self._init_started = time.perf_counter()

    def _end_injection(self, config: EdoraConfig, adapter_name: str) -> None:
        self._progress.close()
        for layer, owner in self._pending_broadcast:  # the same order on every rank
            layer.broadcast_factors(adapter_name, src=owner)
        if self._world > 1:
            logger.info("EDoRA: SVDs split over %d ranks (%d of %d here), factors broadcast", self._world,
                        sum(1 for _, o in self._pending_broadcast if o == self._rank), len(self._pending_broadcast))
        if config.init_weights:
            logger.info("EDoRA: %d layers initialised (%s SVD, r=%d) in %.1f s", len(self._pending_broadcast) or
                        len(self.targeted_module_names), config.svd_method, config.r,
                        time.perf_counter() - self._init_started)

    def _create_and_replace(self, config: EdoraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        seed = layer_seed(config.seed if config.seed is not None else torch.initial_seed() % (2**31), current_key)
        owner = len(self._pending_broadcast) % self._world
        svd_here = owner == self._rank
        if isinstance(target, Linear):
            target.update_layer(adapter_name, config, layer_seed=seed, svd_here=svd_here)
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            backend = resolve_quantization_backend(base)
            if not (isinstance(base, nn.Linear) or (backend is not None and backend.layer_type == "linear")):
                raise TypeError(
                    f"EDoRA can adapt linear layers only; '{current_key}' is a {type(base).__name__}. "
                    "Remove it from target_modules."
                )
            new_module = Linear(target, adapter_name, config, layer_seed=seed, svd_here=svd_here)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            target = new_module
        if self._world > 1:
            self._pending_broadcast.append((target, owner))
        self._progress.update(1)

    @property
    def batch_step_terms(self) -> bool:
        """Training fast path on (default): each step's per-layer terms are computed for all layers at once."""
        return self._step_terms.enabled

    @batch_step_terms.setter
    def batch_step_terms(self, value: bool) -> None:
        self._step_terms.enabled = bool(value)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self._step_terms_hook.remove()  # the plain model left behind needs no EDoRA hook
        self._step_terms.invalidate()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        self._step_terms.invalidate()
        super().delete_adapter(adapter_name)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # called for the first adapter and by add_adapter: set-up and broadcast live here, not in the hooks
        if "_step_terms" not in self.__dict__:
            # on the wrapped model: PeftModel calls it directly when no task_type is set, bypassing this module.
            # The hook holds a weak reference: model -> hook -> tuner -> model would be a cycle, and a deleted
            # model would keep its GPU memory until the next garbage collection.
            self._step_terms = StepTermsCache()
            tuner = weakref.ref(self)

            @torch.compiler.disable  # eager also under torch.compile: the batched terms enter the graph as inputs
            def prepare_step_terms(module, args):
                t = tuner()
                if t is not None:
                    t._step_terms.prepare(t.model, t.active_adapters)

            self._step_terms_hook = model.register_forward_pre_hook(prepare_step_terms)
        config = self.peft_config[adapter_name]
        self._begin_injection(model, config)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._end_injection(config, adapter_name)
            self._step_terms.invalidate()
        except ValueError as e:
            if "not found in the base model" not in str(e):
                raise
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, nn.Linear) or resolve_quantization_backend(m) is not None})
            raise ValueError(f"{e} Linear modules this model has: {linear}") from e
