"""Building a LoRA adapter into a model from a validated plan (shared by inject and load)."""
import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.targets import Target, lora_layers
from fastpeft.methods.replace import put_in
from fastpeft.modules.lora import LoraLinear


def check_new_name(model: nn.Module, name: str) -> None:
    """A layer may still hold an adapter `name` (a LoraLinear built by hand), and no adapter goes into merged layers."""
    clashing = [path for path, m in lora_layers(model) if name in m.settings]
    if clashing:
        raise ValueError(f"layer {clashing[0]!r} already has an adapter named {name!r}")
    merged = [path for path, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"the model has merged layers (e.g. {merged[0]!r}); unmerge(model) before adding an adapter")


def add_adapter(model: nn.Module, config: LoraConfig, name: str, targets: list[Target],
                saved: list[tuple[str, nn.Module]], init: str, autocast_adapter_dtype: bool = True) -> None:
    """Apply an already validated plan (from `find_targets` / `find_saved_modules`)."""
    for t in targets:
        half = t.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if autocast_adapter_dtype and half else None
        if isinstance(t.module, LoraLinear):
            t.module.add_adapter(name, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora, init, dtype)
        else:
            put_in(model, t.path, LoraLinear(t.module, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
                                             init, name, dtype))
    saved_modules.wrap(model, saved, name)
