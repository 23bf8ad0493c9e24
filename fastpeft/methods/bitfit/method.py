"""BitFit as a method: the model's own biases train in place (fastpeft.methods.bitfit.in_place); no weight matrix
requires grad, so a training step computes no weight gradient. Its file: adapter_config.json holding
{"method": "bitfit", <BitFitConfig fields>} and adapter_model.safetensors with keys `base_model.model.<bias name>`
(and `base_model.model.<module path>.<param>` for modules_to_save)."""
import re

from torch import nn

from fastpeft.methods.bitfit.config import BitFitConfig
from fastpeft.methods.in_place import InPlaceMethod
from fastpeft.methods.targets import match_linear

SHOW = 6  # how many bias names an error lists


class BitFitMethod(InPlaceMethod):
    name = "bitfit"
    label = "BitFit"
    config_type = BitFitConfig
    cannot_merge = ("BitFit adapters cannot be merged: they train the model's own bias parameters in place, so the "
                    "model holds them already. merge_and_unload keeps the trained biases and drops the adapter; "
                    "delete_adapter restores the initial biases")

    cli_options = {
        "--bias-pattern": dict(type=str, default=None,
                               help="regex searched in parameter names: only the biases it finds train (default: "
                                    "every bias)"),
    }
    demo_options = {}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> BitFitConfig:
        return BitFitConfig(bias_pattern=None if demo else options["bias_pattern"], modules_to_save=modules_to_save)

    def describe(self, config: BitFitConfig) -> str:
        which = f"the biases matching {config.bias_pattern!r}" if config.bias_pattern else "every bias"
        added = f", new zero biases on {list(config.add_biases)}" if config.add_biases else ""
        return f"BitFit ({which}{added})"

    def select(self, model: nn.Module, config: BitFitConfig, skip: tuple[str, ...]) -> tuple[list[str], list[str]]:
        biases = [key for key, _ in model.named_parameters() if key.rpartition(".")[2] == "bias"
                  and not key.startswith(skip)]
        chosen = [key for key in biases if config.bias_pattern is None or re.search(config.bias_pattern, key)]
        added = []
        if config.add_biases:
            layers = match_linear(model, config.add_biases, config.modules_to_save, method="BitFit")
            added = [path for path, layer in layers if isinstance(layer, nn.Linear) and layer.bias is None]
        if not chosen and not added:
            if not biases:
                raise ValueError(f"{type(model).__name__} has no bias parameters for BitFit to train: give add_biases "
                                 "(linear layers that get a new zero bias, e.g. ['q_proj', 'v_proj'])")
            raise ValueError(f"bias_pattern={config.bias_pattern!r} finds no bias of {type(model).__name__}; its "
                             f"biases are e.g. {biases[:SHOW]}")
        return chosen, added
