"""EDoRA as a PEFT method. `import pipeline.edora` registers it; then `peft.get_peft_model(model, EdoraConfig(...))`,
`model.save_pretrained(dir)` and `peft.PeftModel.from_pretrained(base, dir)` work as for any PEFT method."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import EdoraConfig
from .layer import EdoraLayer, Linear
from .loader import load_edora_adapter, read_adapter_config, save_adapter
from .model import EdoraModel
from .peft_type import EDORA

if EDORA not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="edora", config_cls=EdoraConfig, model_cls=EdoraModel, prefix="edora_")

__all__ = ["EDORA", "EdoraConfig", "EdoraLayer", "EdoraModel", "Linear", "load_edora_adapter", "read_adapter_config",
           "save_adapter"]
