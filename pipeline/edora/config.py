"""EdoraConfig: the options of an EDoRA adapter (arXiv 2501.12067), saved as `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from pipeline.dtypes import FLOAT_DTYPES

from .peft_type import EDORA

SVD_METHODS = ("randomized", "exact")
SVD_TARGETS = ("weight", "direction")
ADAPTER_DTYPES = FLOAT_DTYPES


@dataclass
class EdoraConfig(PeftConfig):
    """Configuration of an EDoRA adapter.

    Per adapted Linear with weight W0 `[out, in]`: magnitude m = row norms of W0 (trainable), frozen B = U_r and
    A = Σ_r V_rᵀ from a truncated SVD, trainable R `[r, r]`; W' = (m / ||W0 + s·B R A||_row) ⊙ (W0 + s·B R A) with
    s = lora_alpha / r. `use_magnitude=False` gives LoRA-XS (W' = W0 + s·B R A).
    """

    r: int = field(default=8, metadata={"help": "Rank of the truncated SVD; R is r x r."})
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": "Scale numerator: s = lora_alpha / r. Default: r (so s = 1), as LoRA-XS/EDoRA."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or a regex, or 'all-linear') to adapt. Default: PEFT's LoRA defaults per model."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) not to adapt."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path's input (0 = reuse base output)."})
    init_sigma: float = field(default=1e-5, metadata={"help": "R ~ N(0, init_sigma^2) (the authors' code: 1e-5)."})
    svd_method: Literal["randomized", "exact"] = field(
        default="randomized",
        metadata={"help": "'randomized' (torch.svd_lowrank, seconds for a 7B model) or 'exact' (torch.linalg.svd)."},
    )
    svd_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    svd_oversample: int = field(default=16, metadata={"help": "Extra columns of the randomized SVD (q = r + this)."})
    svd_target: Literal["weight", "direction"] = field(
        default="weight",
        metadata={"help": "SVD of W0 ('weight', the authors' released code) or of W0 / ||W0||_row ('direction', the "
                          "paper's text)."},
    )
    use_magnitude: bool = field(
        default=True, metadata={"help": "False gives LoRA-XS: frozen SVD factors and R, no magnitude/direction split."}
    )
    adapter_dtype: Literal[ADAPTER_DTYPES] = field(
        default="float32", metadata={"help": "dtype of R, m, A, B and the norm terms (compute runs in the input dtype)."}
    )
    seed: Optional[int] = field(default=None, metadata={"help": "Seed of R's initialisation (None: torch's RNG)."})
    fingerprint_rtol: float = field(
        default=0.05,
        metadata={"help": "Loading refuses a base whose row norms differ from the saved ones by more than this "
                          "(relative, median over rows); 4-bit vs full-precision bases of the same model differ ~1%."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers') when layers_to_transform is set."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Run the SVD at creation. Loaders set False: A and B then come from the saved adapter."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = EDORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        errors = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            errors.append(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.init_sigma >= 0:
            errors.append(f"init_sigma must be >= 0, got {self.init_sigma!r}")
        if self.svd_method not in SVD_METHODS:
            errors.append(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}")
        if self.svd_target not in SVD_TARGETS:
            errors.append(f"svd_target must be one of {SVD_TARGETS}, got {self.svd_target!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            errors.append(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.svd_niter < 0 or self.svd_oversample < 0:
            errors.append("svd_niter and svd_oversample must be >= 0")
        if self.layers_pattern and self.layers_to_transform is None:
            errors.append("layers_pattern needs layers_to_transform")
        if errors:
            raise ValueError("invalid EdoraConfig: " + "; ".join(errors))

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        # A saved adapter carries A and B: loading must not redo the SVD (slow, and not bit-exact across machines).
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config.init_weights = False
        return config
