"""Frozen features as a method: the heads (modules_to_save) train; every other part of the model that holds
parameters is wrapped in FrozenFeatures (eval mode, torch.no_grad, an optional cache). One adapter per model. Its
file: adapter_config.json holding {"method": "frozen_features", <FrozenFeaturesConfig fields>} and
adapter_model.safetensors with `base_model.model.<head path>.<param>` for the heads only."""
import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.files import PREFIX, Entry, check_tensors
from fastpeft.methods.frozen_features.config import FrozenFeaturesConfig
from fastpeft.methods.frozen_features.frozen import FrozenFeatures, frozen_layers, frozen_parts
from fastpeft.methods.replace import put_in
from fastpeft.methods.targets import find_saved_modules
from fastpeft.modules.modules_to_save import ModulesToSave


class FrozenFeaturesMethod(Method):
    name = "frozen_features"
    label = "frozen features"
    config_type = FrozenFeaturesConfig
    one_per_model = True
    cannot_merge = ("frozen-features adapters cannot be merged: they change no weight (the frozen part runs as it "
                    "was, the heads are trained copies). merge_and_unload puts the trained heads in place and "
                    "unwraps the frozen part")

    cli_options = {
        "--cache-size": dict(type=int, default=0,
                             help="distinct inputs whose frozen features are kept (0: no cache; pays off only "
                                  "when the same batches come back)"),
    }
    demo_options = {}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> FrozenFeaturesConfig:
        return FrozenFeaturesConfig(modules_to_save=modules_to_save, cache_size=0 if demo else options["cache_size"])

    def describe(self, config: FrozenFeaturesConfig) -> str:
        cache = f", cache of {config.cache_size} inputs" if config.cache_size else ""
        return f"frozen features (only {list(config.modules_to_save)} train{cache})"

    def _parts(self, model: nn.Module, config) -> tuple[list, list]:
        heads = find_saved_modules(model, config)
        parts = frozen_parts(model, [path for path, _ in heads])
        if not parts:
            raise ValueError(f"modules_to_save={list(config.modules_to_save)} leaves nothing of "
                             f"{type(model).__name__} to freeze: every module with parameters is or holds a head")
        return heads, parts

    def planned_paths(self, model: nn.Module, config) -> set[str]:
        heads, parts = self._parts(model, config)
        return {path for path, _ in heads + parts}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, _ in frozen_layers(model) + saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: FrozenFeaturesConfig, name: str, autocast_adapter_dtype: bool):
        heads, parts = self._parts(model, config)
        saved_modules.wrap(model, heads, name)
        for path, module in parts:
            put_in(model, path, FrozenFeatures(module, config.cache_size))
        return config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """One adapter per model: it runs while it is there."""

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return []  # only the heads, which are modules_to_save

    def disable(self, model: nn.Module):
        """The frozen parts run as in the plain model (the heads' originals run: fastpeft.methods.saved_modules)."""
        layers = [layer for _, layer in frozen_layers(model)]
        before = [layer.disabled for layer in layers]
        for layer in layers:
            layer.set_disabled(True)

        def undo():
            for layer, was in zip(layers, before):
                layer.set_disabled(was)
        return undo

    def delete(self, model: nn.Module, name: str) -> None:
        for path, layer in frozen_layers(model):
            layer.base_layer.train(layer.training)  # back in the model's mode
            model.set_submodule(path, layer.base_layer)

    def unload(self, model: nn.Module, name: str) -> None:
        """Nothing to merge: the frozen parts are unwrapped (the heads are put in by fastpeft.api)."""
        self.delete(model, name)

    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        """merge is refused with the reason; merge_and_unload (`merged_ok`) has nothing to merge."""
        if not merged_ok:
            raise ValueError(self.cannot_merge)

    def file_config(self, saved) -> FrozenFeaturesConfig:
        return FrozenFeaturesConfig.from_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: FrozenFeaturesConfig):
        tensors = {PREFIX + key: value for key, value in saved_modules.state(model, name).items()}
        settings = {**config.to_dict(), "base_model_name_or_path":
                    config.base_model_name_or_path or getattr(model, "name_or_path", None) or None}
        return settings, tensors, {}

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        """Check the heads' keys, shapes and dtypes against the model, then inject and copy them in."""
        config = self.file_config(saved)
        heads, _ = self._parts(model, config)
        entries = {f"{PREFIX}{path}.{key}": Entry(key, tuple(value.shape), value.dtype) for path, module in heads
                   for key, value in (module.original_module if isinstance(module, ModulesToSave) else module)
                   .state_dict().items()}
        check_tensors(entries, saved.tensors, f"{saved.weights_path} does not fit the heads of {type(model).__name__}")
        self.inject(model, config, name, autocast_adapter_dtype)
        with torch.no_grad():
            for key, value in saved_modules.state(model, name).items():
                value.copy_(saved.tensors[PREFIX + key])

        def undo():
            self.delete(model, name)
            saved_modules.delete(model, name)
        return config, undo
