"""The layers a LoraConfig targets, each with its rank and alpha, and the LoRA layers a model holds."""
from dataclasses import dataclass

from torch import nn

from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.targets import match_linear
from fastpeft.modules.lora import LoraLinear


@dataclass(frozen=True)
class Target:
    """A layer to get the adapter: an nn.Linear / Conv1D, or a LoraLinear that gets one more adapter."""

    path: str
    module: nn.Module
    r: int
    lora_alpha: float

    @property
    def base_layer(self) -> nn.Module:
        return self.module.base_layer if isinstance(self.module, LoraLinear) else self.module


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The layers `config.target_modules` selects, with their r and lora_alpha (after rank/alpha_pattern)."""
    matched = match_linear(model, config.target_modules, config.modules_to_save, config.task_type)
    return [Target(path, module, *config.rank_and_alpha(path)) for path, module in matched]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLinear)]


def adapter_layers(model: nn.Module, name: str) -> list[LoraLinear]:
    return [m for _, m in lora_layers(model) if name in m.settings]


def current_targets(model: nn.Module, name: str) -> list[Target]:
    """The targets adapter `name` has, as find_targets found them when it came in."""
    return [Target(path, layer, layer.settings[name].r, layer.settings[name].lora_alpha)
            for path, layer in lora_layers(model) if name in layer.settings]
