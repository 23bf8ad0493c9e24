"""`ModulesToSave`: a module trained and saved in full beside an adapter (PEFT's `modules_to_save`, e.g. a
classifier head). Each adapter gets its own trainable copy; the frozen original runs when none is active."""
import copy

from torch import nn


class ModulesToSave(nn.Module):
    """Same attribute names as PEFT's ModulesToSaveWrapper, so state-dict paths match."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the wrapped module has (`weight`, `out_features`, ...) read through to the one that runs."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)
