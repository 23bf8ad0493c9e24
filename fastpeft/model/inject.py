"""Put LoRA adapters into a model and manage them: `inject`, `set_adapter`, `disable_adapters`, `delete_adapter`,
and the trainable-parameter report. The model remembers its adapters' configs and which one is active."""
import contextlib
import math

import torch
from torch import nn

from fastpeft.model.adapter_config import AdapterConfig
from fastpeft.model.adapter_inject import bottleneck_names, inject_adapters, refuse_lora
from fastpeft.model.config import INITS_SUPPORTED, LoraConfig
from fastpeft.model.diff_config import DiffPruningConfig
from fastpeft.model.diff_inject import diff_names, inject_diff, refuse_diff
from fastpeft.model.replace import put_in
from fastpeft.model.saved_module import ModulesToSave
from fastpeft.model.targets import Target, find_saved_modules, find_targets
from fastpeft.model.validate import check_inject_args
from fastpeft.modules.lora import LoraLinear

CONFIGS = "_fastpeft_configs"  # model attribute: adapter name -> LoraConfig, in injection order
ACTIVE = "_fastpeft_active"  # model attribute: the active adapter's name


def inject(model: nn.Module, config: LoraConfig | AdapterConfig | DiffPruningConfig,
           adapter_name: str = "default", autocast_adapter_dtype: bool = True) -> nn.Module:
    """Wrap the layers `config` targets in LoraLinear (or add the adapter to layers already wrapped), make the new
    adapter active, and freeze everything but it, its `modules_to_save` and the biases `config.bias` names.
    With `autocast_adapter_dtype` (PEFT's default), LoRA weights on float16 / bfloat16 layers are float32.
    An AdapterConfig puts bottleneck adapters in instead (fastpeft.model.adapter_inject), a DiffPruningConfig diff
    pruning's search layers (fastpeft.model.diff_inject)."""
    if isinstance(config, DiffPruningConfig):
        return inject_diff(model, config, adapter_name)
    if isinstance(config, AdapterConfig):
        refuse_diff(model, "bottleneck adapters")
        return inject_adapters(model, config, adapter_name)
    refuse_lora(model)
    refuse_diff(model, "LoRA adapters")
    check_new_adapter(model, config, adapter_name)
    config = config.with_task_heads()
    if config.init_lora_weights not in INITS_SUPPORTED:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} needs PEFT's data-driven initialisation; "
                         f"fastpeft initialises {INITS_SUPPORTED} (adapters trained that way still load)")
    add_adapter(model, config, adapter_name, find_targets(model, config), find_saved_modules(model, config),
                init={True: "default", False: "default", "gaussian": "gaussian"}[config.init_lora_weights],
                autocast_adapter_dtype=autocast_adapter_dtype)
    if config.init_lora_weights is False:  # PEFT: B keeps nn.Linear's init too, so the adapter is not a no-op
        with torch.no_grad():
            for layer in adapter_layers(model, adapter_name):
                nn.init.kaiming_uniform_(layer.lora_B[adapter_name], a=math.sqrt(5))
    return model


def add_adapter(model: nn.Module, config: LoraConfig, name: str, targets: list[Target],
                saved: list[tuple[str, nn.Module]], init: str, autocast_adapter_dtype: bool = True) -> None:
    """Apply an already validated plan (from `find_targets` / `find_saved_modules`) and activate the adapter."""
    for t in targets:
        half = t.base_layer.weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if autocast_adapter_dtype and half else None
        if isinstance(t.module, LoraLinear):
            t.module.add_adapter(name, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora, init, dtype)
        else:
            put_in(model, t.path, LoraLinear(t.module, t.r, t.lora_alpha, config.lora_dropout, config.use_rslora,
                                             init, name, dtype))
    for path, module in saved:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(name)
        put_in(model, path, wrapper)
    if not hasattr(model, CONFIGS):
        setattr(model, CONFIGS, {})
    getattr(model, CONFIGS)[name] = config
    set_adapter(model, name)


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, CONFIGS, {}))


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, ACTIVE, None)


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    configs = getattr(model, CONFIGS, {})
    if name not in configs:
        have = f"it has {sorted(configs)}" if configs else "it has none (inject or load_adapter first)"
        raise ValueError(f"unknown adapter_name {name!r}: {have}")
    return configs[name]


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLinear)]


def adapter_layers(model: nn.Module, name: str) -> list[LoraLinear]:
    return [m for _, m in lora_layers(model) if name in m.settings]


def saved_wrappers(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, ModulesToSave)]


def _lora_only(model: nn.Module, what: str) -> None:
    """An error naming the method where `model` holds bottleneck or diff pruning adapters, which `what` (a LoRA
    management function) does not handle."""
    for names, method in ((bottleneck_names(model), "bottleneck adapters"), (diff_names(model), "diff pruning")):
        if names:
            raise ValueError(f"{what} manages LoRA adapters; {type(model).__name__} holds {method} {names} "
                             "(build a fresh model to drop them)")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the one that runs and trains; layers without it run their base layer. Recomputes
    requires_grad model-wide: only this adapter's LoRA weights, modules_to_save copies and `bias` biases train."""
    _lora_only(model, "set_adapter")
    config = adapter_config(model, adapter_name)
    merged = sorted({m.merged_adapter for _, m in lora_layers(model) if m.merged and m.merged_adapter != adapter_name})
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the model; unmerge(model) before switching to "
                         f"{adapter_name!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter_name if adapter_name in layer.settings else None
        if adapter_name in layer.settings:
            layer.lora_A[adapter_name].requires_grad_(True)
            layer.lora_B[adapter_name].requires_grad_(True)
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in saved_wrappers(model):
        wrapper.active_adapter = adapter_name if adapter_name in wrapper.modules_to_save else None
        if wrapper.active_adapter:
            wrapper.modules_to_save[adapter_name].requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name:
                p.requires_grad_(True)
    setattr(model, ACTIVE, adapter_name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model only (LoRA off, original modules_to_save) inside the `with` block."""
    _lora_only(model, "disable_adapters")
    if not adapter_names(model):
        raise ValueError(f"{type(model).__name__} has no fastpeft adapters to disable")
    switches = [m for _, m in lora_layers(model)] + [m for _, m in saved_wrappers(model)]
    before = [m.disabled for m in switches]
    for m in switches:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(switches, before):
            m.disabled = was


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter; layers left with none go back to their plain base layer. Another one, if any, becomes
    active when the deleted one was."""
    _lora_only(model, "delete_adapter")
    adapter_config(model, adapter_name)
    if any(m.merged_adapter == adapter_name for _, m in lora_layers(model)):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge(model) before deleting it")
    for path, layer in lora_layers(model):
        if adapter_name in layer.settings:
            layer.delete_adapter(adapter_name)
            if not layer.settings:
                model.set_submodule(path, layer.base_layer)
    for path, wrapper in saved_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
            if not len(wrapper.modules_to_save):
                model.set_submodule(path, wrapper.original_module)
    configs = getattr(model, CONFIGS)
    del configs[adapter_name]
    if not configs:
        forget_adapters(model)
    elif active_adapter(model) == adapter_name:
        set_adapter(model, next(iter(configs)))


def forget_adapters(model: nn.Module) -> None:
    """Drop the model's adapter bookkeeping (once no fastpeft layer is left)."""
    for attr in (CONFIGS, ACTIVE):
        if hasattr(model, attr):
            delattr(model, attr)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


def check_new_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Errors for an `inject` / `load_adapter` that cannot add `adapter_name` to `model`."""
    check_inject_args(model, config, LoraConfig, adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; "
                         "delete_adapter it or pick another name")
    clashing = [path for path, m in lora_layers(model) if adapter_name in m.settings]
    if clashing:
        raise ValueError(f"layer {clashing[0]!r} already has an adapter named {adapter_name!r}")
    merged = [path for path, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"the model has merged layers (e.g. {merged[0]!r}); unmerge(model) before adding an adapter")
