"""Argument checks shared by the LoRA and bottleneck-adapter entry points."""
from torch import nn


def check_inject_args(model, config, config_type: type, adapter_name) -> None:
    """`model` is a module, `config` a `config_type`, `adapter_name` a usable name (errors name each)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, config_type):
        raise TypeError(f"config must be a fastpeft {config_type.__name__}, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if hasattr(nn.ModuleDict(), adapter_name) or hasattr(nn.ParameterDict(), adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} is an attribute of torch's ModuleDict / ParameterDict, "
                         "which hold the adapters by name: choose another")
