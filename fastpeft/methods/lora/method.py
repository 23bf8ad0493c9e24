"""LoRA as a method: LoraLinear layers on the targets (several named adapters per layer, one active), merge / unmerge
/ unload, and PEFT's file format (fastpeft.methods.lora.files)."""
import math

import torch
from torch import nn

from fastpeft.arguments import positive_int, target_modules
from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.switches import switch_off
from fastpeft.methods.lora import files
from fastpeft.methods.lora.config import INITS_SUPPORTED, LoraConfig
from fastpeft.methods.lora.build import add_adapter, check_new_name
from fastpeft.methods.lora.targets import adapter_layers, find_targets, lora_layers
from fastpeft.methods.targets import find_saved_modules, match_names, tied_elsewhere

INITS = {True: "default", False: "default", "gaussian": "gaussian"}  # init_lora_weights -> LoraLinear's init
PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "use_rslora", "bias",
               "rank_pattern", "alpha_pattern")  # what the demo's peft.LoraConfig is given


class LoraMethod(Method):
    name = "lora"
    label = "LoRA"
    config_type = LoraConfig
    peft_type = "LORA"

    cli_options = {
        "--r": dict(type=positive_int, default=8, help="LoRA rank (the demo's lora_alpha is 2 r)"),
        "--lora-alpha": dict(type=float, default=16.0, help="LoRA scaling numerator (scaling = alpha / r)"),
        "--lora-dropout": dict(type=float, default=0.1, help="dropout on the LoRA input"),
        "--target-modules": dict(type=target_modules, default="all-linear",
                                 help='comma-separated module names (e.g. "query,value") or "all-linear"'),
    }
    demo_options = {"--r": 8}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> LoraConfig:
        if demo:  # MiniLM's attention query / value projections
            return LoraConfig(r=options["r"], lora_alpha=2 * options["r"], lora_dropout=0.1,
                              target_modules=["query", "value"], modules_to_save=modules_to_save)
        return LoraConfig(r=options["r"], lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                          target_modules=options["target_modules"], modules_to_save=modules_to_save)

    def describe(self, config: LoraConfig) -> str:
        return (f"LoRA r={config.r} alpha={config.lora_alpha:g} dropout={config.lora_dropout:g} "
                f"on {config.target_modules}")

    def peft_config(self, config: LoraConfig):
        import peft  # only the demo's comparison needs it
        return peft.LoraConfig(**{k: v for k, v in config.to_peft_dict().items() if k in PEFT_FIELDS})

    def planned_paths(self, model: nn.Module, config: LoraConfig) -> set[str]:
        config = config.with_task_heads()
        targets = match_names(model, config.target_modules, config.modules_to_save, config.task_type)
        return {path for path, _ in targets} | {path for path, _ in find_saved_modules(model, config)}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, layer in lora_layers(model) if name in layer.settings} | \
            {path for path, _ in saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: LoraConfig, name: str, autocast_adapter_dtype: bool) -> LoraConfig:
        if config.init_lora_weights not in INITS_SUPPORTED:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} needs PEFT's data-driven initialisation; "
                             f"fastpeft initialises {INITS_SUPPORTED} (adapters trained that way still load)")
        check_new_name(model, name)
        config = config.with_task_heads()
        add_adapter(model, config, name, find_targets(model, config), find_saved_modules(model, config),
                    INITS[config.init_lora_weights], autocast_adapter_dtype)
        if config.init_lora_weights is False:  # PEFT: B keeps nn.Linear's init too, so the adapter is not a no-op
            with torch.no_grad():
                for layer in adapter_layers(model, name):
                    nn.init.kaiming_uniform_(layer.lora_B[name], a=math.sqrt(5))
        return config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        merged = sorted({m.merged_adapter for _, m in lora_layers(model) if m.merged and m.merged_adapter != name})
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the model; unmerge(model) before switching to "
                             f"{name!r}")
        for _, layer in lora_layers(model):
            layer.active_adapter = name if name in layer.settings else None

    def trainable(self, model: nn.Module, name: str, config: LoraConfig) -> list[nn.Parameter]:
        """The adapter's A and B, and the biases `config.bias` names."""
        params = []
        for layer in adapter_layers(model, name):
            params += [layer.lora_A[name], layer.lora_B[name]]
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                params.append(layer.base_layer.bias)
        if config.bias == "all":
            params += [p for key, p in model.named_parameters() if key.endswith("bias")
                       and ".modules_to_save." not in key and ".original_module." not in key]
        return params

    def disable(self, model: nn.Module):
        return switch_off(layer for _, layer in lora_layers(model))

    def delete(self, model: nn.Module, name: str) -> None:
        if any(m.merged_adapter == name for _, m in lora_layers(model)):
            raise ValueError(f"adapter {name!r} is merged; unmerge(model) before deleting it")
        for path, layer in lora_layers(model):
            if name in layer.settings:
                layer.delete_adapter(name)
                if not layer.settings:
                    model.set_submodule(path, layer.base_layer)

    def reads(self, file_config: dict) -> bool:
        # PEFT's files name no method; those of its other methods (e.g. PROMPT_TUNING) are other methods' to read
        return "method" not in file_config and file_config.get("peft_type") in (None, self.peft_type)

    def file_config(self, saved) -> LoraConfig:
        return LoraConfig.from_peft_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: LoraConfig):
        return files.state(model, name, config)

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None) -> LoraConfig:
        return files.load(model, saved, self.file_config(saved), name, autocast_adapter_dtype, existing_config)

    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        merged = self.merged_paths(model)
        if merged and not merged_ok:
            raise ValueError(f"the model is already merged (e.g. {merged[0]!r}); unmerge(model) first")
        for path, layer in lora_layers(model):
            shared = tied_elsewhere(model, path + ".base_layer", layer.base_layer.weight) \
                if name in layer.settings else []
            if shared:
                raise ValueError(f"{path}'s weight is shared with {shared[0]} (tied weights): merging the adapter "
                                 f"into it would change that module too; untie the weights first, or keep the "
                                 f"adapter unmerged")

    def merge(self, model: nn.Module, name: str) -> None:
        for layer in adapter_layers(model, name):
            layer.merge(name)

    def merged_paths(self, model: nn.Module) -> list[str]:
        return [path for path, layer in lora_layers(model) if layer.merged]

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in lora_layers(model):
            if layer.merged:
                layer.unmerge()

    def unload(self, model: nn.Module, name: str) -> None:
        for layer in adapter_layers(model, name):
            if not layer.merged:
                layer.merge(name)
        for path, layer in lora_layers(model):
            model.set_submodule(path, layer.base_layer)
