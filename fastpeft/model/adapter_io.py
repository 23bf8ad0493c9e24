"""Save and load bottleneck adapters in the project's file pattern: `adapter_config.json` holding
{"method": "bottleneck_adapter", <AdapterConfig fields>} and `adapter_model.safetensors` with keys
`base_model.model.<wrapper path>.adapter.<param>` (down.weight [m, d], down.bias, up.weight [d, m], up.bias,
layer_norm.*) and, as for LoRA, `base_model.model.<module path>.<param>` for modules_to_save.

`save_adapter` / `load_adapter` of fastpeft.model.io hand bottleneck adapters to these functions. Writes are atomic;
a load builds and fills the adapters aside, checking every key, shape and dtype, before it touches the model."""
import torch
from torch import nn

from fastpeft.model.adapter_config import AdapterConfig
from fastpeft.model.adapter_inject import adapter_wrappers, apply, bottleneck_config, plan
from fastpeft.model.files import PREFIX, read_adapter, write_adapter
from fastpeft.model.io import Entry, _check_tensors
from fastpeft.model.saved_module import ModulesToSave


def save_bottleneck(model: nn.Module, directory, adapter_name: str = "default") -> None:
    config = bottleneck_config(model, adapter_name)
    wrappers = dict(adapter_wrappers(model))
    saved = {path: m for path, m in model.named_modules() if isinstance(m, ModulesToSave)}
    tensors = {PREFIX + key: value for key, value in _file_state(wrappers, saved, adapter_name).items()}
    settings = {**config.to_dict(), "base_model_name_or_path":
                config.base_model_name_or_path or getattr(model, "name_or_path", None) or None}
    write_adapter(directory, settings, tensors)


def load_bottleneck(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Put the saved adapters into `model` (which must have none yet), trainable as after `inject`."""
    files = read_adapter(directory)
    config = AdapterConfig.from_dict(files.config, source=files.config_path)
    weights_path, tensors = files.weights_path, files.tensors
    planned = plan(model, config, adapter_name)
    state = _file_state(planned.wrappers, planned.saved, adapter_name)
    entries = {PREFIX + key: Entry(key, tuple(value.shape), value.dtype) for key, value in state.items()}
    _check_tensors(entries, tensors, f"{weights_path} does not fit the {config.placement} bottleneck adapters of "
                                     f"{type(model).__name__}")
    with torch.no_grad():
        for key, value in state.items():
            value.copy_(tensors[PREFIX + key])
    return apply(model, config, adapter_name, planned)


def _file_state(wrappers: dict[str, nn.Module], saved: dict[str, ModulesToSave], name: str) -> dict:
    """File key (without PREFIX) -> the live tensor it is read from / written to."""
    state = {f"{path}.adapter.{key}": value for path, wrapper in wrappers.items()
             for key, value in wrapper.adapter.state_dict().items()}
    state.update({f"{path}.{key}": value for path, wrapper in saved.items() if name in wrapper.modules_to_save
                  for key, value in wrapper.modules_to_save[name].state_dict().items()})
    return state
