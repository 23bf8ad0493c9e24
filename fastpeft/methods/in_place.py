"""`InPlaceMethod`: methods that train some of the base model's own parameters in place, wrapping no module (BitFit:
the biases; full fine-tuning: every parameter). The model holds the trained values, so each adapter keeps a copy of
the initial values of what it trains (an attribute of the model, beside its record; not in its state_dict) to run
the base model (`disable_adapters`: swapped in, then back out) and to restore it (`delete_adapter`). Bias-free linear
layers may get a new zero bias (BitFit on Llama-style models), removed again on delete.

File: adapter_model.safetensors holds `base_model.model.<parameter name>` for every trained parameter, plus the
modules_to_save as every method saves them. Merge is refused: the trained values already are the model's weights
(nothing to add, nothing to take out); merge_and_unload keeps them and drops the initial copies."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.files import PREFIX, Entry, check_tensors
from fastpeft.methods.targets import find_saved_modules
from fastpeft.modules.modules_to_save import ModulesToSave


@dataclass
class Selection:
    """What an adapter trains: parameters of the model (by name) and bias-free nn.Linear layers (by path) that get a
    new zero bias; and the modules_to_save (path, module)."""

    names: list[str]
    added: list[str]
    saved: list[tuple[str, nn.Module]]

    def trained(self) -> list[str]:
        return self.names + [f"{path}.bias" for path in self.added]


@dataclass
class Trained:
    """One injected adapter: the initial values of the parameters it trains, and the layers it gave a bias."""

    initial: dict[str, torch.Tensor]
    added: list[str]

    def names(self) -> list[str]:
        return list(self.initial) + [f"{path}.bias" for path in self.added]


def file_entries(model: nn.Module, found: Selection) -> dict[str, Entry]:
    """File key -> its model key, shape and dtype, for what `found` selects (read before anything is injected)."""
    tensors = {key: model.get_parameter(key) for key in found.names}
    for path in found.added:
        layer = model.get_submodule(path)
        tensors[f"{path}.bias"] = torch.empty(layer.out_features, dtype=layer.weight.dtype, device="meta")
    for path, module in found.saved:
        original = module.original_module if isinstance(module, ModulesToSave) else module
        tensors.update({f"{path}.{key}": value for key, value in original.state_dict().items()})
    return {PREFIX + key: Entry(key, tuple(t.shape), t.dtype) for key, t in tensors.items()}


def owners(names: list[str]) -> set[str]:
    """The modules (paths) holding the named parameters."""
    return {name.rpartition(".")[0] for name in names}


class InPlaceMethod(Method):
    one_per_model = True  # two adapters would train the same parameters
    initial_on_cpu = False  # where the initial copies live (full fine-tuning: on the CPU, they are a whole model)

    def select(self, model: nn.Module, config, skip: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """(names of the model's parameters that train, paths of bias-free linear layers that get a zero bias),
        leaving out the modules under the `skip` prefixes (the modules_to_save); raises where nothing fits."""
        raise NotImplementedError

    def selection(self, model: nn.Module, config) -> Selection:
        saved = find_saved_modules(model, config)
        names, added = self.select(model, config, tuple(f"{path}." for path, _ in saved))
        return Selection(names, added, saved)

    @property
    def _attribute(self) -> str:
        return f"_fastpeft_{self.name}_initial"

    def _adapters(self, model: nn.Module) -> dict[str, Trained]:
        return getattr(model, self._attribute, {})

    def _forget(self, model: nn.Module, name: str) -> Trained:
        adapters = self._adapters(model)
        adapter = adapters.pop(name)
        if not adapters:
            delattr(model, self._attribute)
        return adapter

    # --- what it wraps: nothing; it claims the modules whose parameters it trains --------------------------------
    def planned_paths(self, model: nn.Module, config) -> set[str]:
        found = self.selection(model, config)
        return owners(found.trained()) | {path for path, _ in found.saved}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return owners(self._adapters(model)[name].names()) | {path for path, _ in saved_modules.wrappers(model, name)}

    # --- life cycle ------------------------------------------------------------------------------------------------
    def inject(self, model: nn.Module, config, name: str, autocast_adapter_dtype: bool):
        self._apply(model, self.selection(model, config), name)
        return config

    def _apply(self, model: nn.Module, found: Selection, name: str) -> None:
        saved_modules.wrap(model, found.saved, name)
        initial = {}
        for key in found.names:
            p = model.get_parameter(key)
            initial[key] = p.detach().to("cpu" if self.initial_on_cpu else p.device, copy=True)
        for path in found.added:
            layer = model.get_submodule(path)
            layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        model.__dict__.setdefault(self._attribute, {})[name] = Trained(initial, list(found.added))

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """One adapter per model: it trains while it is there."""

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return [model.get_parameter(key) for key in self._adapters(model)[name].names()]

    @torch.no_grad()
    def disable(self, model: nn.Module):
        """The initial values swapped in (the trained ones kept aside), the added biases taken out."""
        trained, added = [], []
        for adapter in self._adapters(model).values():
            for key, initial in adapter.initial.items():
                p = model.get_parameter(key)
                trained.append((p, p.detach().clone()))
                p.copy_(initial)
            for path in adapter.added:
                layer = model.get_submodule(path)
                added.append((layer, layer.bias))
                layer.bias = None

        @torch.no_grad()
        def undo():
            for p, value in trained:
                p.copy_(value)
            for layer, bias in added:
                layer.bias = bias
        return undo

    @torch.no_grad()
    def delete(self, model: nn.Module, name: str) -> None:
        adapter = self._forget(model, name)
        for key, initial in adapter.initial.items():
            model.get_parameter(key).copy_(initial)
        for path in adapter.added:
            model.get_submodule(path).bias = None  # a bias-free layer again, as before

    # --- files -----------------------------------------------------------------------------------------------------
    def file_config(self, saved):
        return self.config_type.from_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config):
        tensors = {PREFIX + key: model.get_parameter(key) for key in self._adapters(model)[name].names()}
        tensors.update({PREFIX + key: value for key, value in saved_modules.state(model, name).items()})
        settings = {**config.to_dict(), "base_model_name_or_path":
                    config.base_model_name_or_path or getattr(model, "name_or_path", None) or None}
        return settings, tensors, {}

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        """Check every key, shape and dtype against what the config selects, then inject and copy the values in."""
        config = self.file_config(saved)
        found = self.selection(model, config)
        entries = file_entries(model, found)
        check_tensors(entries, saved.tensors, f"{saved.weights_path} does not fit the {self.label} adapter of "
                                              f"{type(model).__name__}")
        self._apply(model, found, name)
        live = {key: model.get_parameter(key) for key in found.trained()}
        live.update(saved_modules.state(model, name))
        with torch.no_grad():
            for key, value in live.items():
                value.copy_(saved.tensors[PREFIX + key])

        def undo():
            self.delete(model, name)
            saved_modules.delete(model, name)
        return config, undo

    # --- merge: the trained values are in the weights already ------------------------------------------------------
    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        """merge is refused with the reason; merge_and_unload (`merged_ok`) keeps what is in place."""
        if not merged_ok:
            raise ValueError(self.cannot_merge)

    def unload(self, model: nn.Module, name: str) -> None:
        """The trained values stay (they are the model's parameters); the initial copies go."""
        self._forget(model, name)
