"""Bottleneck adapters as a method: BottleneckAdapter wrappers at the placement's sites (fastpeft.methods.bottleneck
.sites), one adapter per model, never merged. Its file: adapter_config.json holding {"method": "bottleneck",
<BottleneckConfig fields>} and adapter_model.safetensors with keys `base_model.model.<wrapper path>.adapter.<param>`
(down.weight [m, d], down.bias, up.weight [d, m], up.bias, layer_norm.*) and `base_model.model.<module path>.<param>`
for modules_to_save."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.arguments import positive_int
from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.switches import switch_off
from fastpeft.methods.bottleneck.config import PLACEMENTS, BottleneckConfig
from fastpeft.methods.bottleneck.sites import adapter_wrappers, sites
from fastpeft.methods.files import PREFIX, Entry, check_tensors
from fastpeft.methods.replace import put_in
from fastpeft.methods.targets import find_saved_modules
from fastpeft.modules.adapter import BottleneckAdapter
from fastpeft.modules.modules_to_save import ModulesToSave


@dataclass
class Plan:
    """Wrappers ready to go in (`path -> wrapper`) and modules_to_save wrappers; built without touching the model."""

    wrappers: dict[str, nn.Module]
    saved: dict[str, ModulesToSave]


class BottleneckMethod(Method):
    name = "bottleneck"
    label = "bottleneck"
    config_type = BottleneckConfig
    one_per_model = True
    cannot_merge = ("bottleneck adapters cannot be merged into the base weights: they add scaling * "
                    "up(act(down(y))), a nonlinear function of a layer's output y, not a change of any weight. Keep "
                    "the adapter modules (save_adapter / load_adapter) instead")

    cli_options = {
        "--placement": dict(choices=PLACEMENTS, default="houlsby", help="where bottleneck adapters go"),
        "--bottleneck": dict(type=positive_int, default=32, help="bottleneck adapter width"),
    }
    demo_options = {}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> BottleneckConfig:
        placement, width = ("houlsby", 32) if demo else (options["placement"], options["bottleneck"])
        return BottleneckConfig(placement=placement, bottleneck=width, dropout=0.1, modules_to_save=modules_to_save)

    def describe(self, config: BottleneckConfig) -> str:
        size = f"bottleneck {config.bottleneck}" if config.bottleneck else f"reduction {config.reduction_factor:g}"
        return (f"bottleneck adapters ({config.placement}), {size}, {config.activation}, dropout={config.dropout:g}, "
                f"init {config.init}")

    def planned_paths(self, model: nn.Module, config: BottleneckConfig) -> set[str]:
        return {site.path for site in sites(model, config.placement)} | \
            {path for path, _ in find_saved_modules(model, config)}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, _ in adapter_wrappers(model)} | {path for path, _ in saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: BottleneckConfig, name: str, autocast_adapter_dtype: bool):
        apply(model, plan(model, config, name))
        return config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """One adapter per model: it runs while it is there."""

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return [p for _, wrapper in adapter_wrappers(model) for p in wrapper.adapter.parameters()]

    def disable(self, model: nn.Module):
        return switch_off(wrapper for _, wrapper in adapter_wrappers(model))

    def delete(self, model: nn.Module, name: str) -> None:
        for path, wrapper in adapter_wrappers(model):
            model.set_submodule(path, wrapper.base_layer)

    def file_config(self, saved) -> BottleneckConfig:
        return BottleneckConfig.from_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: BottleneckConfig):
        tensors = {PREFIX + key: value for key, value in
                   _file_state(dict(adapter_wrappers(model)), dict(saved_modules.wrappers(model, name)), name).items()}
        settings = {**config.to_dict(), "base_model_name_or_path":
                    config.base_model_name_or_path or getattr(model, "name_or_path", None) or None}
        return settings, tensors, {}

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        """Build and fill the adapters aside, checking every key, shape and dtype, then put them in."""
        config = self.file_config(saved)
        planned = plan(model, config, name)
        state = _file_state(planned.wrappers, planned.saved, name)
        entries = {PREFIX + key: Entry(key, tuple(value.shape), value.dtype) for key, value in state.items()}
        check_tensors(entries, saved.tensors, f"{saved.weights_path} does not fit the {config.placement} bottleneck "
                                              f"adapters of {type(model).__name__}")
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(saved.tensors[PREFIX + key])
        apply(model, planned)

        def undo():
            self.delete(model, name)
            saved_modules.delete(model, name)
        return config, undo


def plan(model: nn.Module, config: BottleneckConfig, name: str) -> Plan:
    """Build the adapters `config` puts into `model` (freshly initialised) and the modules_to_save copies."""
    found = sites(model, config.placement)
    saved = find_saved_modules(model, config)
    overlap = [p for p, _ in saved for s in found if p == s.path or s.path.startswith(p + ".") or
               p.startswith(s.path + ".")]
    if overlap:
        raise ValueError(f"modules_to_save names {overlap[0]!r}, which holds or is inside a bottleneck adapter site")
    wrappers = {}
    for site in found:
        weight = site.projection.weight
        try:
            adapter = BottleneckAdapter(site.projection.out_features, config.bottleneck, config.reduction_factor,
                                        config.activation, config.init, config.dropout, config.scaling,
                                        config.layer_norm, device=weight.device, dtype=weight.dtype)
        except ValueError as e:
            raise ValueError(f"adapter at {site.path}: {e}") from e
        wrappers[site.path] = site.wrapper(site.module, adapter)
    saved_wrappers = {}
    for path, module in saved:
        saved_wrappers[path] = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        saved_wrappers[path].add_adapter(name)
    return Plan(wrappers, saved_wrappers)


def apply(model: nn.Module, planned: Plan) -> None:
    """Put the planned modules in."""
    for path, module in {**planned.wrappers, **planned.saved}.items():
        put_in(model, path, module)


def _file_state(wrappers: dict[str, nn.Module], saved: dict[str, ModulesToSave], name: str) -> dict:
    """File key (without PREFIX) -> the live tensor it is read from / written to."""
    state = {f"{path}.adapter.{key}": value for path, wrapper in wrappers.items()
             for key, value in wrapper.adapter.state_dict().items()}
    state.update({f"{path}.{key}": value for path, wrapper in saved.items() if name in wrapper.modules_to_save
                  for key, value in wrapper.modules_to_save[name].state_dict().items()})
    return state
