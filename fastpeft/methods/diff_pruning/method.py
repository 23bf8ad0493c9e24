"""Diff pruning (Guo, Rush & Kim 2021) as a method. `inject` wraps the targets in DiffSearchLinear (stage 1: dense
diffs under hard-concrete L0 gates); `search.project_to_density` fixes the mask (stage 2: SparseDeltaLinear layers,
built merged: the base weight holds W0 + delta in place). One adapter per model; the file is the fixed-mask stage."""
from torch import nn

from fastpeft.arguments import density, positive_int, target_modules
from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.switches import switch_off
from fastpeft.methods.diff_pruning import files
from fastpeft.methods.diff_pruning.config import DiffPruningConfig
from fastpeft.methods.diff_pruning.layers import build_layers, search_layers, sparse_layers
from fastpeft.methods.diff_pruning.search import closed_gates, describe_mask, l0_penalty, project_to_density
from fastpeft.methods.files import PREFIX
from fastpeft.methods.replace import put_in
from fastpeft.methods.targets import find_saved_modules, match_linear, match_names, tied_elsewhere
from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.sparse_delta import SparseDeltaLinear

LABEL = "diff pruning"
# The demo: 1 search epoch, then 2 fixed-mask epochs at lr 3e-3 (about 20 s on 2 CPU cores). Measured test accuracy
# (seeds 0 / 1, from 51% / 48%): density 0.005: 77% / 73%, 0.01: 83% / 81%, 0.02: 87% / 88%.
DEMO_TARGETS, DEMO_DENSITY = ["query", "value"], 0.02
# The gates' learning rate as a multiple of the run's (L0-pruning code commonly gives the gates their own, larger
# rate). AdamW moves a parameter by about lr a step and log_alpha starts at 5 (every gate open); even so, the demo's
# 25 search steps close no gate, and projection ranks the gated diffs by magnitude.
GATE_LR_SCALE = 100.0


class DiffPruningMethod(Method):
    name = "diff_pruning"
    label = LABEL
    config_type = DiffPruningConfig
    one_per_model = True

    cli_options = {
        "--target-modules": dict(type=target_modules, default="all-linear",
                                 help='comma-separated module names (e.g. "query,value") or "all-linear"'),
        "--search-epochs": dict(type=positive_int, default=1,
                                help="epochs of the L0-penalised search before the mask is fixed"),
        "--density": dict(type=density, default=DiffPruningConfig.density,
                          help="fraction of each targeted weight's entries kept"),
    }
    demo_options = {"--search-epochs": 1, "--density": DEMO_DENSITY}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> DiffPruningConfig:
        targets = DEMO_TARGETS if demo else options["target_modules"]
        return DiffPruningConfig(target_modules=targets, density=options["density"], modules_to_save=modules_to_save)

    def describe(self, config: DiffPruningConfig) -> str:
        return (f"diff pruning (density {config.density:g} {config.scope}, L0 search: l0_weight "
                f"{config.l0_weight:g}, temperature {config.temperature:g}, stretch {config.stretch}, "
                f"log_alpha_init {config.log_alpha_init:g}{', structured' if config.structured else ''}) "
                f"on {config.target_modules}")

    def before_training(self, model: nn.Module, config, train, options: dict, log) -> None:
        """Stage 1: `search_epochs` of training under the L0 penalty; then the projection to the config's density."""
        result = train(options["search_epochs"], penalty=lambda: l0_penalty(model), desc="search",
                       lr_scales={"log_alpha": GATE_LR_SCALE})
        log(f"search: {len(result.step_ms)} steps (median {result.median_step_ms():.1f} ms/step), final loss "
            f"{result.losses[-1]:.3f}, L0 term {l0_penalty(model).item():.4f}, {closed_gates(model):.1%} of the "
            "gates closed")
        project_to_density(model)
        log(describe_mask(model))

    def planned_paths(self, model: nn.Module, config: DiffPruningConfig) -> set[str]:
        targets = match_names(model, config.target_modules, config.modules_to_save)
        return {path for path, _ in targets} | {path for path, _ in find_saved_modules(model, config)}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, _ in search_layers(model) + sparse_layers(model)} | \
            {path for path, _ in saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: DiffPruningConfig, name: str, autocast_adapter_dtype: bool):
        """Zero diffs: the model computes what it did."""
        targets, saved = find_sites(model, config)
        layers = build_layers(targets, lambda _, module: DiffSearchLinear(
            module, config.temperature, config.stretch, config.log_alpha_init, config.structured))
        apply(model, layers, saved, name)
        return config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """One adapter per model: it runs while it is there."""

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        """Stage 1: the diffs and gates; stage 2: the kept values."""
        params = []
        for _, layer in search_layers(model):
            params += [layer.diff] + list(layer.gate.parameters())
            if layer.group_gate is not None:
                params += list(layer.group_gate.parameters())
        return params + [layer.values for _, layer in sparse_layers(model)]

    def disable(self, model: nn.Module):
        """Search layers run their base layer; fixed-mask layers are unmerged (W0 back in the weight) meanwhile."""
        layers = [layer for _, layer in search_layers(model) + sparse_layers(model)]
        remerge = [layer for layer in layers if getattr(layer, "merged", False)]
        for layer in remerge:
            layer.unmerge()
        switch_on = switch_off(layers)

        def undo():
            switch_on()
            for layer in remerge:
                layer.merge()
        return undo

    def delete(self, model: nn.Module, name: str) -> None:
        for path, layer in search_layers(model) + sparse_layers(model):
            if getattr(layer, "merged", False):
                layer.unmerge()  # W0 back, bit-exactly
            model.set_submodule(path, layer.base_layer)

    def file_config(self, saved) -> DiffPruningConfig:
        return DiffPruningConfig.from_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: DiffPruningConfig):
        return files.state(model, name, config)

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        """The targets become merged SparseDeltaLinear layers, trainable as after `project_to_density`."""
        config = self.file_config(saved)
        try:
            targets, found = find_sites(model, config)
        except ValueError as e:
            raise ValueError(f"{saved.config_path}: {e}") from e
        files.check(model, saved, config, dict(targets), dict(found))
        tensors = saved.tensors

        def layer(path: str, module: nn.Module) -> SparseDeltaLinear:
            device = module.weight.device
            return SparseDeltaLinear(module, tensors[f"{PREFIX}{path}.indices"].to(device),
                                     tensors[f"{PREFIX}{path}.values"].to(device))

        apply(model, build_layers(targets, layer), found, name)
        saved_modules.copy_in(model, name, tensors, PREFIX)

        def undo():
            self.delete(model, name)
            saved_modules.delete(model, name)
        return config, undo

    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        if search_layers(model):
            raise ValueError("the diff pruning adapter is still searching (stage 1); project_to_density(model) "
                             "first: only the fixed-mask layers merge")
        merged = self.merged_paths(model)
        if merged and not merged_ok:
            raise ValueError(f"the model is already merged (e.g. {merged[0]!r}; diff pruning layers are built "
                             "merged); unmerge(model) first")

    def merge(self, model: nn.Module, name: str) -> None:
        for _, layer in sparse_layers(model):
            layer.merge()

    def merged_paths(self, model: nn.Module) -> list[str]:
        return [path for path, layer in sparse_layers(model) if layer.merged]

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in sparse_layers(model):
            if layer.merged:
                layer.unmerge()

    def unload(self, model: nn.Module, name: str) -> None:
        for path, layer in sparse_layers(model):
            if layer.merged:
                layer.sync()  # values trained since the last forward
            else:
                layer.merge()
            model.set_submodule(path, layer.base_layer)


def find_sites(model: nn.Module, config: DiffPruningConfig) -> tuple[list, list]:
    """([(path, linear layer)] the config targets, [(path, module)] its modules_to_save); changes nothing."""
    targets = match_linear(model, config.target_modules, config.modules_to_save, method=LABEL)
    _refuse_shared_weights(model, targets)
    return targets, find_saved_modules(model, config)


def _refuse_shared_weights(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """The fixed-mask stage writes W0 + delta into the base weight in place, which a tied weight (an output head
    sharing the input embedding) would carry into the other module, and the values' gradient would miss that use."""
    for path, module in targets:
        shared = tied_elsewhere(model, path, module.weight)
        if shared:
            raise ValueError(f"{path}.weight is shared with {shared[0]} (tied weights); diff pruning writes the "
                             f"delta into the weight in place, so leave {path!r} out of target_modules or untie it")


def apply(model: nn.Module, layers: dict[str, nn.Module], saved: list[tuple[str, nn.Module]], name: str) -> None:
    """Put the built layers (path -> DiffSearchLinear / SparseDeltaLinear) and modules_to_save copies in."""
    for path, layer in layers.items():
        put_in(model, path, layer)
    saved_modules.wrap(model, saved, name)
