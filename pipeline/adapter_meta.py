"""`edora_meta.json`, what training records beside an adapter (read by merge and eval), and `QuantInfo`, the 4-bit
settings a base was loaded with: the one place a BitsAndBytesConfig is built (train, merge verification)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

META_FILE = "edora_meta.json"
BNB_4BIT_BLOCKSIZE = 64  # BitsAndBytesConfig's fixed 4-bit blocksize


@dataclass
class QuantInfo:
    """How a base is quantized (bitsandbytes 4-bit, as BitsAndBytesConfig does). The defaults are the recipe's
    (pipeline/recipe_schema.py ModelConfig): a setting a file leaves out means what the recipe would have used."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = BNB_4BIT_BLOCKSIZE
    base_dtype: str = "bfloat16"     # dtype the checkpoint was cast to before quantizing (from_pretrained dtype=)
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    source: str = ""                 # the file this came from

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_model_section(cls, model: dict, source: str = "") -> QuantInfo:
        """From a recipe's model section (a mapping; keys it leaves out take the recipe's defaults)."""
        given = {"quant_type": model.get("bnb_4bit_quant_type"), "double_quant": model.get("bnb_4bit_use_double_quant"),
                 "base_dtype": model.get("dtype"), "compute_dtype": model.get("bnb_4bit_compute_dtype"),
                 "quant_storage": model.get("bnb_4bit_quant_storage")}
        return cls(**{k: v for k, v in given.items() if v is not None}, source=source)

    def bnb_config(self):
        """The transformers BitsAndBytesConfig that loads a base with these settings."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                  bnb_4bit_quant_storage=getattr(torch, self.quant_storage))


@dataclass
class AdapterMeta:
    """edora_meta.json: the base an adapter was trained on (for the merge: its fingerprint and 4-bit settings, to
    redo the round trip exactly) and the prompt format it was trained with (for `eval --prompt auto`)."""

    schema: int = 1
    base_model: str | None = None
    base_dtype: str | None = None
    base_load_in_4bit: bool = False
    bnb_4bit_quant_type: str | None = None
    bnb_4bit_use_double_quant: bool | None = None
    bnb_4bit_compute_dtype: str | None = None
    bnb_4bit_quant_storage: str | None = None
    bnb_4bit_blocksize: int | None = None
    method: str | None = None
    recipe: str | None = None
    global_step: int | None = None
    # the base weights this adapter adapts (merging/checks.py base_fingerprint); null when the base is not a local
    # or cached safetensors checkpoint, e.g. a .gguf file
    base_fingerprint: str | None = None
    prompt_format: str | None = None  # metamath or chat

    @classmethod
    def for_training(cls, model, method: str, recipe: str, global_step: int, base_fingerprint: str | None,
                     prompt_format: str | None) -> AdapterMeta:
        """What training writes, from the recipe's model section `model` (a ModelConfig)."""
        q = model.load_in_4bit
        return cls(base_model=model.name_or_path, base_dtype=model.dtype, base_load_in_4bit=q,
                   bnb_4bit_quant_type=model.bnb_4bit_quant_type if q else None,
                   bnb_4bit_use_double_quant=model.bnb_4bit_use_double_quant if q else None,
                   bnb_4bit_compute_dtype=model.bnb_4bit_compute_dtype if q else None,
                   bnb_4bit_quant_storage=model.bnb_4bit_quant_storage if q else None,
                   bnb_4bit_blocksize=BNB_4BIT_BLOCKSIZE if q else None, method=method, recipe=recipe,
                   global_step=global_step, base_fingerprint=base_fingerprint, prompt_format=prompt_format)

    def write(self, adapter_dir: str | Path) -> Path:
        path = Path(adapter_dir) / META_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, adapter_dir: str | Path) -> AdapterMeta | None:
        """The adapter dir's edora_meta.json, None when it has none; keys this version does not know are ignored."""
        path = Path(adapter_dir) / META_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a JSON object; it was not written by training")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def quant(self, source: str = "") -> QuantInfo | None:
        """The 4-bit settings the base was loaded with in training; None when it was not quantized."""
        if not self.base_load_in_4bit:
            return None
        given = {"quant_type": self.bnb_4bit_quant_type, "double_quant": self.bnb_4bit_use_double_quant,
                 "blocksize": self.bnb_4bit_blocksize, "base_dtype": self.base_dtype,
                 "compute_dtype": self.bnb_4bit_compute_dtype, "quant_storage": self.bnb_4bit_quant_storage}
        return QuantInfo(**{k: v for k, v in given.items() if v is not None}, source=source)
