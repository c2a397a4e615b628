"""Loading an EDoRA adapter directory with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError


class AdapterError(UserError, ValueError):
    """An adapter dir that cannot be loaded; the message says what is wrong and how to fix it."""


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The raw adapter_config.json of a local adapter dir, checked to be an EDoRA (or PEFT LoRA/DoRA) adapter."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter directory: {path} is missing "
                           "(pass the 'adapter' folder that training wrote, e.g. runs/<name>/adapter)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); the adapter directory is damaged") from e
    if "peft_type" not in cfg:
        raise AdapterError(f"{path} has no 'peft_type'; it was not written by PEFT")
    return cfg


def load_edora_adapter(base_model, adapter_dir: str | Path, is_trainable: bool = False, **kwargs):
    """`PeftModel.from_pretrained` for EDoRA (and plain PEFT) adapters, with clear errors on a wrong base."""
    from peft import PeftModel

    read_adapter_config(adapter_dir)
    try:
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable, **kwargs)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise AdapterError(
                f"the adapter in {adapter_dir} does not fit this base model (tensor shapes differ): it was made for "
                f"another architecture or size. Details: {str(e).splitlines()[1:3]}"
            ) from e
        raise


CARD_NOTE = """
## How to load this EDoRA adapter

This is an **EDoRA** adapter (arXiv 2501.12067): PEFT alone cannot load it and stops with `KeyError: 'EDORA'`.
Install this project's `pipeline` package (see its README) and import it first:

```python
import pipeline.edora  # registers EDoRA with PEFT
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{path}")
```

To serve it (vLLM cannot load EDoRA adapters), merge it: `python -m pipeline merge --adapter {path}`.
"""


def add_card_note(adapter_dir: str | Path) -> None:
    """Append to the adapter's model card (PEFT's README.md) how to load an EDoRA adapter; idempotent."""
    card = Path(adapter_dir) / "README.md"
    text = card.read_text() if card.exists() else ""
    if "How to load this EDoRA adapter" not in text:
        card.write_text(text + CARD_NOTE.format(path=adapter_dir))


def save_adapter(model, adapter_dir: str | Path, **kwargs) -> Path:
    """`model.save_pretrained` plus a model card that says how to load an EDoRA adapter."""
    adapter_dir = Path(adapter_dir)
    model.save_pretrained(str(adapter_dir), **kwargs)
    add_card_note(adapter_dir)
    return adapter_dir
