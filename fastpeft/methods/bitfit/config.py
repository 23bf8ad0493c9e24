"""`BitFitConfig`: BitFit (Ben Zaken, Ravfogel & Goldberg 2022), validated on creation, and its conversion to and
from the dict saved as `adapter_config.json`."""
import re
from dataclasses import dataclass

from fastpeft.methods.config import MethodConfig, names


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """Trains the model's bias terms in place: every parameter named `bias`, or those whose full name `bias_pattern`
    finds (`re.search`, e.g. "attention|intermediate"; anchor with ^ / $). `add_biases` names bias-free linear layers
    (module-name suffixes, e.g. ["q_proj", "v_proj"] on Llama, which has no biases) that get a new zero bias to
    train; `bias_pattern` does not filter those. `modules_to_save` are trained in full (e.g. a classifier head)."""

    METHOD = "bitfit"
    LABEL = "BitFit"

    bias_pattern: str | None = None
    add_biases: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.bias_pattern is not None:
            if not isinstance(self.bias_pattern, str) or not self.bias_pattern:
                raise ValueError(f"bias_pattern must be a non-empty regex string (or None: every bias), got "
                                 f"{self.bias_pattern!r}")
            try:
                re.compile(self.bias_pattern)
            except re.error as e:
                raise ValueError(f"bias_pattern {self.bias_pattern!r} is not a valid regex: {e}") from e
        if self.add_biases is not None:
            object.__setattr__(self, "add_biases", names("add_biases", self.add_biases))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")
