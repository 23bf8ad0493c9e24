"""Whole-model merge: fold the active adapter into the base weights (`merge`), restore them bit-exactly (`unmerge`),
or fold and strip every fastpeft layer (`merge_and_unload`). LoRA adapters and diff pruning's fixed-mask layers
(which are built merged: SparseDeltaLinear keeps W0 + delta in the base weight) merge; bottleneck adapters do not."""
from torch import nn

from fastpeft.model.adapter_inject import refuse_merge
from fastpeft.model.diff_inject import diff_names, forget_diff, search_layers, sparse_layers
from fastpeft.model.inject import active_adapter, adapter_config, forget_adapters, lora_layers, saved_wrappers
from fastpeft.model.targets import tied_elsewhere


def merge(model: nn.Module) -> nn.Module:
    """Merge the active adapter into every layer that has it (delta in fp32, rounded once per weight)."""
    if diff_names(model):
        layers = _diff_layers(model)
        merged = [path for path, m in layers if m.merged]
        if merged:
            raise ValueError(f"the model is already merged (e.g. {merged[0]!r}; diff pruning layers are built "
                             "merged); unmerge(model) first")
        for _, layer in layers:
            layer.merge()
        return model
    name = _active(model)
    merged = [path for path, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"the model is already merged (e.g. {merged[0]!r}); unmerge(model) first")
    for layer in _mergeable(model, name):
        layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight to its exact pre-merge bits."""
    layers = [m for _, m in _diff_layers(model) + lora_layers(model) if m.merged]
    if not layers:
        raise ValueError("unmerge(model): no layer of the model is merged")
    for layer in layers:
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and replace every fastpeft layer by a plain one: LoraLinear / SparseDeltaLinear by
    its (merged) nn.Linear / Conv1D, a modules_to_save wrapper by the active adapter's copy. Returns `model`,
    changed in place."""
    if diff_names(model):
        for path, layer in _diff_layers(model):
            if layer.merged:
                layer.sync()  # values trained since the last forward
            else:
                layer.merge()
            model.set_submodule(path, layer.base_layer)
        forget_diff(model)
    else:
        name = _active(model)
        for layer in _mergeable(model, name):
            if not layer.merged:
                layer.merge(name)
        for path, layer in lora_layers(model):
            model.set_submodule(path, layer.base_layer)
        forget_adapters(model)
    for path, wrapper in saved_wrappers(model):
        wrapper.disabled = False
        model.set_submodule(path, wrapper.active_module)
    return model


def _mergeable(model: nn.Module, name: str) -> list:
    """The LoRA layers holding adapter `name`; an error, before any is merged, if one's weight is tied to another
    module's (merging would change that module too)."""
    layers = [(path, m) for path, m in lora_layers(model) if name in m.settings]
    for path, layer in layers:
        shared = tied_elsewhere(model, path + ".base_layer", layer.base_layer.weight)
        if shared:
            raise ValueError(f"{path}'s weight is shared with {shared[0]} (tied weights): merging the adapter into "
                             f"it would change that module too; untie the weights first, or keep the adapter "
                             f"unmerged")
    return [m for _, m in layers]


def _diff_layers(model: nn.Module) -> list:
    """The fixed-mask layers of a diff pruning model; an error while it is still searching (dense diffs)."""
    if search_layers(model):
        raise ValueError("the diff pruning adapter is still searching (stage 1); project_to_density(model) first: "
                         "only the fixed-mask layers merge")
    return sparse_layers(model)


def _active(model: nn.Module) -> str:
    refuse_merge(model)
    name = active_adapter(model)
    adapter_config(model, name)  # a clear error when the model has no adapters
    return name
