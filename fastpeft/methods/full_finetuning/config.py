"""`FullFinetuningConfig`: full fine-tuning, the baseline every parameter-efficient method is measured against."""
from dataclasses import dataclass

from fastpeft.methods.config import MethodConfig, names


@dataclass(frozen=True)
class FullFinetuningConfig(MethodConfig):
    """Every parameter of the model trains in place; `modules_to_save` (e.g. a new classifier head) train in their
    own copies, as with the other methods, so that disable_adapters runs the original ones."""

    METHOD = "full_finetuning"
    LABEL = "full fine-tuning"

    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")
