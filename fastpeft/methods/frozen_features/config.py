"""`FrozenFeaturesConfig`: a frozen feature extractor under trained heads (linear probing when the head is a
classifier), validated on creation, and its conversion to and from the dict saved as `adapter_config.json`."""
from dataclasses import dataclass

from fastpeft.methods.config import MethodConfig, names


@dataclass(frozen=True)
class FrozenFeaturesConfig(MethodConfig):
    """`modules_to_save` (required) are the heads that train, e.g. ["classifier"]; the rest of the model is frozen
    and runs in eval mode under torch.no_grad. `cache_size` > 0 keeps the frozen part's outputs for that many
    distinct inputs (fastpeft.methods.frozen_features.cache): worth it when the same batches come back, e.g. a
    static, unshuffled dataset over several epochs; 0 (the default) caches nothing."""

    METHOD = "frozen_features"
    LABEL = "frozen features"

    modules_to_save: tuple[str, ...] | None = None
    cache_size: int = 0
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.modules_to_save is None:
            raise ValueError("modules_to_save is required: the heads that train on the frozen features, e.g. "
                             "['classifier']")
        object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0: no cache), got {self.cache_size!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")
