"""Reading a saved adapter for merging: config, per-module factors, and how its base was loaded in training."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.adapter_meta import META_FILE, AdapterMeta, QuantInfo  # noqa: F401 - re-exported
from pipeline.errors import UserError

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
EDORA_PARTS = ("edora_A", "edora_B", "edora_R", "edora_magnitude", "edora_row_norm2")
# Resolved recipes the trainer may leave in the adapter dir or the run dir (read only when edora_meta.json is absent).
RECIPE_FILES = ("recipe.yaml", "resolved_recipe.yaml", "recipe.resolved.yaml")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class Adapter:
    dir: Path
    config: dict
    tensor_file: Path
    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module name -> part -> key in the file
    replaced: dict[str, str] = field(default_factory=dict)          # base key -> key in the file (modules_to_save)
    quant: QuantInfo | None = None

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"])

    @property
    def scaling(self) -> float:
        return float(self.config["lora_alpha"] if self.config.get("lora_alpha") is not None else self.config["r"]) \
            / int(self.config["r"])

    @property
    def use_magnitude(self) -> bool:
        return bool(self.config.get("use_magnitude", True))

    def load(self, key: str):
        """One tensor of the adapter, as fp32 (ZeRO-3 saves 16-bit; the merge math runs in fp32)."""
        import torch

        if self.tensor_file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(self.tensor_file), framework="pt") as f:
                t = f.get_tensor(key)
        else:
            t = _bin_state(self.tensor_file)[key]
        return t.to(torch.float32) if t.is_floating_point() else t

    def factors(self, module: str) -> dict:
        return {part: self.load(key) for part, key in self.modules[module].items()}


_BIN_CACHE: dict = {}


def _bin_state(path: Path) -> dict:
    import torch

    if path not in _BIN_CACHE:
        _BIN_CACHE.clear()
        _BIN_CACHE[path] = torch.load(path, map_location="cpu", weights_only=True)
    return _BIN_CACHE[path]


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read an adapter dir; raises UserError for a missing dir, a damaged one, or an adapter type we cannot merge."""
    from pipeline.edora.loader import AdapterError, read_adapter_config

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter directory {adapter_dir} does not exist (pass the 'adapter' folder that training "
                        "wrote, e.g. runs/<name>/adapter)")
    try:
        cfg = read_adapter_config(adapter_dir)
    except AdapterError as e:
        raise UserError(str(e)) from e
    files = [adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    tensor_file = next((f for f in files if f.is_file()), None)
    if tensor_file is None:
        raise UserError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors: the adapter "
                        "weights are missing (was training interrupted before saving?)")
    adapter = Adapter(dir=adapter_dir, config=cfg, tensor_file=tensor_file, quant=read_quant_info(adapter_dir))
    if adapter.peft_type not in ("EDORA", "LORA"):
        raise UserError(f"{adapter_dir} holds a PEFT '{adapter.peft_type}' adapter; merge supports EDoRA (and "
                        "LoRA-XS) adapters, and PEFT LoRA/DoRA adapters through PEFT's merge_and_unload")
    check_tensor_types(adapter.peft_type, _tensor_keys(tensor_file), tensor_file)
    if adapter.peft_type == "EDORA":
        _index_edora_keys(adapter)
    return adapter


def _tensor_keys(path: Path) -> list[str]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(_bin_state(path))
    except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise many types for a damaged file
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}): the file is truncated or "
                        "damaged. Restore it, or use the adapter of a checkpoint-N dir of the same run") from None


def _index_edora_keys(adapter: Adapter) -> None:
    for key in _tensor_keys(adapter.tensor_file):
        if not key.startswith(PREFIX):
            raise UserError(f"unexpected tensor '{key}' in {adapter.tensor_file}: not a PEFT adapter file")
        name = key[len(PREFIX):]
        module, _, part = name.rpartition(".")
        if part in EDORA_PARTS:
            adapter.modules.setdefault(module, {})[part] = key
        elif "edora_" in part or "lora_" in part:
            raise UserError(f"unknown adapter tensor '{key}' in {adapter.tensor_file}; this merge knows "
                            f"{', '.join(EDORA_PARTS)}")
        else:  # modules_to_save: a full replacement of the base tensor
            adapter.replaced[name] = key
    need = {"edora_A", "edora_B", "edora_R", "edora_row_norm2"} | ({"edora_magnitude"} if adapter.use_magnitude
                                                                   else set())
    for module, parts in adapter.modules.items():
        missing = need - set(parts)
        if missing:
            raise UserError(f"adapter {adapter.dir} is incomplete: module '{module}' lacks {sorted(missing)}")
    if not adapter.modules:
        raise UserError(f"adapter {adapter.dir} has no EDoRA tensors in {adapter.tensor_file.name}")


def read_quant_info(adapter_dir: Path) -> QuantInfo | None:
    """The 4-bit settings the adapter was trained with: edora_meta.json, else a resolved recipe beside it.

    None means the base was not quantized in training (or nothing says it was)."""
    meta = AdapterMeta.read(adapter_dir)
    if meta is not None:
        return meta.quant(source=str(adapter_dir / META_FILE))
    for d in (adapter_dir, adapter_dir.parent):
        for name in RECIPE_FILES:
            path = d / name
            if path.is_file():
                import yaml

                data = yaml.safe_load(path.read_text())
                model = (data.get("model") if isinstance(data, dict) else None) or {}
                if not model.get("load_in_4bit", False):
                    return None
                return QuantInfo.from_model_section(model, source=str(path))
    return None


def has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


def check_tensor_types(peft_type: str, keys: list[str], tensor_file: Path) -> None:
    """adapter_config.json's peft_type must match the tensors: an edited or mixed-up config never merges as a no-op."""
    edora = [k for k in keys if ".edora_" in k]
    lora = [k for k in keys if ".lora_" in k]
    if peft_type == "EDORA" and lora:
        raise UserError(f"{tensor_file.parent}/adapter_config.json says peft_type EDORA but {tensor_file.name} holds "
                        f"LoRA tensors (e.g. {lora[0]}): the config does not belong to these weights")
    if peft_type != "EDORA" and edora:
        raise UserError(f"{tensor_file.parent}/adapter_config.json says peft_type {peft_type} but {tensor_file.name} "
                        f"holds EDoRA tensors (e.g. {edora[0]}): the config was edited or mixed up. Restore "
                        "\"peft_type\": \"EDORA\" (the adapter dir training wrote)")
    if peft_type == "LORA" and not lora:
        raise UserError(f"{tensor_file} holds no LoRA tensors (lora_A/lora_B) although adapter_config.json says "
                        "peft_type LORA: the adapter is empty or damaged")
