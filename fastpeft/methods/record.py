"""The one record of the adapters on a model: adapter name -> (method, config) in the order they came in, and the
active adapter of each method. One attribute of the model, so that copy.deepcopy and pickling carry it along."""
from dataclasses import dataclass, field

from torch import nn

ATTRIBUTE = "_fastpeft_adapters"


@dataclass
class Entry:
    method: str
    config: object


@dataclass
class Record:
    adapters: dict[str, Entry] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)  # method -> its active adapter, most recently set last

    def names(self, method: str | None = None) -> list[str]:
        return [name for name, e in self.adapters.items() if method is None or e.method == method]

    def entry(self, name: str) -> Entry:
        if name not in self.adapters:
            have = f"it has {sorted(self.adapters)}" if self.adapters else "it has none (inject or load_adapter first)"
            raise ValueError(f"unknown adapter_name {name!r}: {have}")
        return self.adapters[name]

    def set_active(self, method: str, name: str | None) -> None:
        self.active.pop(method, None)
        if name is not None:
            self.active[method] = name  # re-inserted: the most recently activated comes last


def record(model: nn.Module) -> Record:
    """The model's record (an empty one, not stored, for a model without adapters)."""
    return getattr(model, ATTRIBUTE, None) or Record()


def stored_record(model: nn.Module) -> Record:
    """The model's record, created (and stored on it) if it has none yet."""
    if getattr(model, ATTRIBUTE, None) is None:
        setattr(model, ATTRIBUTE, Record())
    return getattr(model, ATTRIBUTE)


def forget(model: nn.Module) -> None:
    if hasattr(model, ATTRIBUTE):
        delattr(model, ATTRIBUTE)
