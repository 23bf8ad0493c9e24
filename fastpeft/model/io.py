"""Save and load LoRA adapters in exactly the Hugging Face PEFT format: `adapter_config.json` plus
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` ([r, in]) / `.lora_B.weight`
([out, r]), modules_to_save under `base_model.model.<module path>.<param>`, biases per `bias`.

Writes swap both files in at once (fastpeft.model.files). Loads check every key, shape and dtype against the model
before touching it, and leave it unchanged on any error."""
import os
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.model.adapter_config import AdapterConfig
from fastpeft.model.adapter_inject import bottleneck_names, refuse_lora
from fastpeft.model.config import ALL_LINEAR, LoraConfig
from fastpeft.model.diff_config import DiffPruningConfig
from fastpeft.model.diff_inject import diff_names, refuse_diff
from fastpeft.model.files import CONFIG_NAME, PREFIX, listed, read_adapter, read_config, write_adapter
from fastpeft.model.inject import (active_adapter, adapter_config, adapter_layers, adapter_names, add_adapter,
                                   check_new_adapter, delete_adapter, lora_layers, saved_wrappers, set_adapter)
from fastpeft.model.saved_module import ModulesToSave
from fastpeft.model.targets import Target, find_saved_modules, find_targets
from fastpeft.modules.linear import linear_features
from fastpeft.modules.lora import LoraLinear



@dataclass(frozen=True)
class Entry:
    """Where one file tensor lives in the model (its state-dict key once the adapter is in), and its shape/dtype."""

    model_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write adapter `adapter_name` of `model` to `directory` in PEFT's format (peft's PeftModel.from_pretrained
    loads it). Both files are written completely, then renamed into place. Bottleneck adapters: adapter_io; diff
    pruning: diff_io."""
    if diff_names(model):  # a model with a diff pruning adapter holds no other kind
        from fastpeft.model import diff_io  # diff pruning; diff_io builds on this module
        return diff_io.save_diff(model, directory, adapter_name)
    if adapter_name in bottleneck_names(model):
        from fastpeft.model import adapter_io  # bottleneck adapters; adapter_io builds on this module
        return adapter_io.save_bottleneck(model, directory, adapter_name)
    config = adapter_config(model, adapter_name)
    targets, saved = _current_plan(model, adapter_name)
    entries = adapter_entries(model, config, adapter_name, targets, saved)
    state = model.state_dict()
    write_adapter(directory, config.to_peft_dict(**_file_overrides(model, config, targets)),
                  {key: state[e.model_key] for key, e in entries.items()})


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter from `directory` as `adapter_name` and make it active. Injects it when the
    model has no adapter of that name yet (LoRA weights on float16 / bfloat16 layers in float32 with
    `autocast_adapter_dtype`, as PEFT), else overwrites that adapter's weights (its settings must agree).
    A saved bottleneck adapter (method "bottleneck_adapter") is loaded by adapter_io instead, a diff pruning one
    (method "diff_pruning") by diff_io."""
    from fastpeft.model import adapter_io, diff_io  # other methods; they build on this module
    method = saved_method(directory)
    if method == DiffPruningConfig.METHOD:
        return diff_io.load_diff(model, directory, adapter_name)
    if method == AdapterConfig.METHOD:
        refuse_diff(model, "bottleneck adapters")
        return adapter_io.load_bottleneck(model, directory, adapter_name)
    if method is not None:
        raise ValueError(f"{os.path.join(os.fspath(directory), CONFIG_NAME)}: unknown method {method!r}; "
                         f"fastpeft reads {AdapterConfig.METHOD!r}, {DiffPruningConfig.METHOD!r} and PEFT's LoRA files "
                         "(which name no method)")
    refuse_lora(model)
    refuse_diff(model, "LoRA adapters")
    saved_files = read_adapter(directory)
    config = LoraConfig.from_peft_dict(saved_files.config, source=saved_files.config_path)
    weights_path, tensors = saved_files.weights_path, saved_files.tensors
    if tensors and not any(k.startswith(PREFIX) for k in tensors):  # written without PEFT's prefix (PEFT accepts it)
        tensors = {PREFIX + k: v for k, v in tensors.items()}
    existing = adapter_name in adapter_names(model)
    if existing:
        targets, saved = _current_plan(model, adapter_name)
        _check_settings(model, config, adapter_name, targets)
    else:
        check_new_adapter(model, config, adapter_name)
        targets, saved = find_targets(model, config), find_saved_modules(model, config)
    if config.bias == "all":
        tensors = _without_wrapper_biases(tensors, saved)
    entries = adapter_entries(model, config, adapter_name, targets, saved)
    _check_tensors(entries, tensors, f"{weights_path} does not fit adapter {adapter_name!r} of {type(model).__name__}")

    previous, backups = active_adapter(model), []
    try:
        if not existing:
            add_adapter(model, config, adapter_name, targets, saved, init="zeros",
                        autocast_adapter_dtype=autocast_adapter_dtype)
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, entry in entries.items():
                destination = state[entry.model_key]
                backups.append((destination, destination.detach().clone()))
                destination.copy_(tensors[key])
        set_adapter(model, adapter_name)
    except BaseException:
        with torch.no_grad():  # put back what was overwritten (existing adapters, base biases), then drop the new one
            for destination, backup in backups:
                destination.copy_(backup)
        if not existing and adapter_name in adapter_names(model):
            delete_adapter(model, adapter_name)
        if previous is not None:
            set_adapter(model, previous)
        raise
    return model


def saved_method(directory) -> str | None:
    """The "method" a saved adapter directory names (None for PEFT's LoRA files, which name none, and for unreadable
    ones, whose problem the LoRA loader then reports)."""
    try:
        raw = read_config(directory)
    except (OSError, ValueError):
        return None
    return raw.get("method") if isinstance(raw, dict) else None


def adapter_entries(model: nn.Module, config: LoraConfig, name: str, targets: list[Target],
                    saved: list[tuple[str, nn.Module]]) -> dict[str, Entry]:
    """File key -> Entry for every tensor the adapter's file holds, computed from the plan alone (so a load can be
    checked before the adapter exists)."""
    entries = {}
    for t in targets:
        in_features, out_features = linear_features(t.base_layer)
        dtype = t.base_layer.weight.dtype
        entries[f"{PREFIX}{t.path}.lora_A.weight"] = Entry(f"{t.path}.lora_A.{name}", (t.r, in_features), dtype)
        entries[f"{PREFIX}{t.path}.lora_B.weight"] = Entry(f"{t.path}.lora_B.{name}", (out_features, t.r), dtype)
    for path, module in saved:
        copy = module.modules_to_save[name] if isinstance(module, ModulesToSave) and name in module.modules_to_save \
            else getattr(module, "original_module", module)
        for key, value in copy.state_dict().items():
            entries[f"{PREFIX}{path}.{key}"] = Entry(f"{path}.modules_to_save.{name}.{key}", tuple(value.shape),
                                                     value.dtype)
    for key, (model_key, value) in _biases(model, config, targets, saved).items():
        entries[PREFIX + key] = Entry(model_key, tuple(value.shape), value.dtype)
    return entries


def _biases(model, config, targets, saved) -> dict[str, tuple[str, torch.Tensor]]:
    """File key -> (state_dict key once the adapter is in, bias) for the biases `config.bias` saves. The file names
    them as PEFT's model holding only this adapter does: `<path>.base_layer.bias` in this adapter's layers,
    `<path>.bias` elsewhere, also in layers that only other adapters wrap."""
    if config.bias == "lora_only":
        return {f"{t.path}.base_layer.bias": (f"{t.path}.base_layer.bias", t.base_layer.bias) for t in targets
                if t.base_layer.bias is not None}
    if config.bias == "none":
        return {}
    wrapped_now = {f"{t.path}.bias": f"{t.path}.base_layer.bias" for t in targets
                   if not isinstance(t.module, LoraLinear)}
    targeted = {t.path for t in targets}
    unwrapped_in_file = {f"{path}.base_layer.bias": f"{path}.bias" for path, _ in lora_layers(model)
                         if path not in targeted}
    inside = tuple(path + "." for path, _ in saved + saved_wrappers(model))
    biases = {}
    for key, value in model.state_dict().items():
        if (key == "bias" or key.endswith(".bias")) and not key.startswith(inside):
            model_key = wrapped_now.get(key, key)
            biases[unwrapped_in_file.get(key, model_key)] = (model_key, value)
    return biases


def _without_wrapper_biases(tensors: dict, saved) -> dict:
    """peft's bias="all" files also hold the biases of its ModulesToSaveWrapper's internals
    (`<path>.original_module.bias`, `<path>.modules_to_save.bias`): copies of `<path>.bias` and the frozen base."""
    internals = tuple(f"{PREFIX}{path}.{part}." for path, _ in saved for part in ("original_module", "modules_to_save"))
    return {k: v for k, v in tensors.items() if not k.startswith(internals)}


def _current_plan(model, name) -> tuple[list[Target], list[tuple[str, nn.Module]]]:
    targets = [Target(path, layer, layer.settings[name].r, layer.settings[name].lora_alpha)
               for path, layer in lora_layers(model) if name in layer.settings]
    saved = [(path, w) for path, w in saved_wrappers(model) if name in w.modules_to_save]
    return targets, saved


def _check_settings(model, config: LoraConfig, name: str, targets: list[Target]) -> None:
    """Loading into an existing adapter: its bias mode, dropout, modules_to_save and per-layer r, alpha and rsLoRA
    must be the file's."""
    if any(layer.merged_adapter == name for layer in adapter_layers(model, name)):
        raise ValueError(f"adapter {name!r} is merged; unmerge(model) before loading weights into it")
    current, wrong = adapter_config(model, name), []
    for field in ("bias", "lora_dropout", "modules_to_save"):
        have, want = getattr(current, field), getattr(config, field)
        if (sorted(have or ()) != sorted(want or ())) if field == "modules_to_save" else have != want:
            wrong.append(f"{field}: model {have!r}, file {want!r}")
    for t in targets:
        have = t.module.settings[name]
        r, alpha = config.rank_and_alpha(t.path)
        if (have.r, have.lora_alpha, have.use_rslora) != (r, float(alpha), config.use_rslora):
            wrong.append(f"{t.path}: model r={have.r}, alpha={have.lora_alpha:g}, rslora={have.use_rslora}; "
                         f"file r={r}, alpha={alpha:g}, rslora={config.use_rslora}")
    if wrong:
        raise ValueError(f"the file's config does not match existing adapter {name!r} (delete_adapter it first to "
                         f"load this one): " + listed(wrong))


def _check_tensors(entries: dict[str, Entry], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries))
    shapes, dtypes = [], []
    for key in sorted(set(entries) & set(tensors)):
        e, t = entries[key], tensors[key]
        if tuple(t.shape) != e.shape:
            shapes.append(f"{key}: file {tuple(t.shape)}, model {e.shape}")
        if t.dtype != e.dtype and not (t.dtype.is_floating_point and e.dtype.is_floating_point):
            dtypes.append(f"{key}: file {t.dtype}, model {e.dtype}")
    problems = [f"{label} ({len(items)}): {listed(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes),
                 ("dtype mismatches", dtypes)) if items]
    if problems:
        raise ValueError(f"{what}:\n  " + "\n  ".join(problems))


def _file_overrides(model, config: LoraConfig, targets: list[Target]) -> dict:
    """What peft's save_pretrained fills in from the model: Conv1D's fan_in_fan_out, resolved "all-linear", the
    base model's name, the auto_mapping of a config without task_type."""
    overrides = {"fan_in_fan_out": any(t.module.fan_in_fan_out for t in targets), "inference_mode": True}
    if config.target_modules == ALL_LINEAR:
        overrides["target_modules"] = sorted(t.path for t in targets)
    if config.base_model_name_or_path is None:
        overrides["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    if config.task_type is None:
        overrides["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return overrides
