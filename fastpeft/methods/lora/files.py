"""LoRA adapters in exactly the Hugging Face PEFT format: `adapter_config.json` plus `adapter_model.safetensors` with
keys `base_model.model.<module path>.lora_A.weight` ([r, in]) / `.lora_B.weight` ([out, r]), modules_to_save under
`base_model.model.<module path>.<param>`, biases per `bias`. A load checks every key, shape and dtype against the model
before touching it, and leaves it unchanged on any error."""
import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.config import ALL_LINEAR
from fastpeft.methods.files import PREFIX, Entry, SavedAdapter, check_tensors, listed
from fastpeft.methods.lora.build import add_adapter, check_new_name
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.targets import Target, adapter_layers, current_targets, find_targets, lora_layers
from fastpeft.methods.targets import find_saved_modules
from fastpeft.modules.linear import linear_features
from fastpeft.modules.lora import LoraLinear


def state(model: nn.Module, name: str, config: LoraConfig) -> tuple[dict, dict, dict]:
    """(PEFT's adapter_config.json, its tensors, no extra metadata) for adapter `name`: what peft's
    PeftModel.from_pretrained loads."""
    targets, saved = current_targets(model, name), saved_modules.wrappers(model, name)
    entries = adapter_entries(model, config, name, targets, saved)
    model_state = model.state_dict()
    return (config.to_peft_dict(**_file_overrides(model, config, targets)),
            {key: model_state[e.model_key] for key, e in entries.items()}, {})


def load(model: nn.Module, saved: SavedAdapter, config: LoraConfig, name: str, autocast_adapter_dtype: bool,
         existing_config: LoraConfig | None):
    """Put the file's adapter into `model` as `name`, or its weights into the existing adapter `name` (whose config,
    `existing_config`, must agree). Returns (the config to record, a function undoing the load)."""
    tensors = saved.tensors
    if tensors and not any(k.startswith(PREFIX) for k in tensors):  # written without PEFT's prefix (PEFT accepts it)
        tensors = {PREFIX + k: v for k, v in tensors.items()}
    existing = existing_config is not None
    if existing:
        targets, wrapped = current_targets(model, name), saved_modules.wrappers(model, name)
        _check_settings(model, existing_config, config, name, targets)
    else:
        check_new_name(model, name)
        targets, wrapped = find_targets(model, config), find_saved_modules(model, config)
    if config.bias == "all":
        tensors = _without_wrapper_biases(tensors, wrapped)
    entries = adapter_entries(model, config, name, targets, wrapped)
    check_tensors(entries, tensors, f"{saved.weights_path} does not fit adapter {name!r} of {type(model).__name__}")

    backups = []

    def undo():
        with torch.no_grad():  # put back what was overwritten (existing adapters, base biases), then drop the new one
            for destination, backup in backups:
                destination.copy_(backup)
        if not existing:
            for path, layer in lora_layers(model):
                if name in layer.settings:
                    layer.delete_adapter(name)
                    if not layer.settings:
                        model.set_submodule(path, layer.base_layer)
            saved_modules.delete(model, name)
    try:
        if not existing:
            add_adapter(model, config, name, targets, wrapped, init="zeros",
                        autocast_adapter_dtype=autocast_adapter_dtype)
        model_state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, entry in entries.items():
                destination = model_state[entry.model_key]
                backups.append((destination, destination.detach().clone()))
                destination.copy_(tensors[key])
    except BaseException:
        undo()
        raise
    return (existing_config or config), undo


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
    entries.update(saved_modules.entries(saved, name, PREFIX))
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
    inside = tuple(path + "." for path, _ in saved + saved_modules.wrappers(model))
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


def _check_settings(model, current: LoraConfig, config: LoraConfig, name: str, targets: list[Target]) -> None:
    """Loading into an existing adapter: its bias mode, dropout, modules_to_save and per-layer r, alpha and rsLoRA
    must be the file's."""
    if any(layer.merged_adapter == name for layer in adapter_layers(model, name)):
        raise ValueError(f"adapter {name!r} is merged; unmerge(model) before loading weights into it")
    wrong = []
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
