"""Whole-model merge: fold the active adapter into the base weights (`merge`), restore them bit-exactly (`unmerge`),
or fold and strip every fastpeft layer (`merge_and_unload`)."""
from torch import nn

from fastpeft.model.adapter_inject import refuse_merge
from fastpeft.model.inject import active_adapter, adapter_config, forget_adapters, lora_layers, saved_wrappers


def merge(model: nn.Module) -> nn.Module:
    """Merge the active adapter into every layer that has it (delta in fp32, rounded once per weight)."""
    name = _active(model)
    layers = [m for _, m in lora_layers(model) if name in m.settings]
    merged = [path for path, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"the model is already merged (e.g. {merged[0]!r}); unmerge(model) first")
    for layer in layers:
        layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight to its exact pre-merge bits."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    if not layers:
        raise ValueError("unmerge(model): no layer of the model is merged")
    for layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and replace every fastpeft layer by a plain one: LoraLinear by its (merged)
    nn.Linear / Conv1D, a modules_to_save wrapper by the active adapter's copy. Returns `model`, changed in place."""
    name = _active(model)
    for path, layer in lora_layers(model):
        if name in layer.settings and not layer.merged:
            layer.merge(name)
        model.set_submodule(path, layer.base_layer)
    for path, wrapper in saved_wrappers(model):
        wrapper.disabled = False
        model.set_submodule(path, wrapper.active_module)
    forget_adapters(model)
    return model


def _active(model: nn.Module) -> str:
    refuse_merge(model)
    name = active_adapter(model)
    adapter_config(model, name)  # a clear error when the model has no adapters
    return name
