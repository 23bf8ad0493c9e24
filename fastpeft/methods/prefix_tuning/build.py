"""Putting prefix tuning into a model and taking it out (shared by inject, load and delete): a plan made without
touching the model, then the adapter's PrefixEncoder in the model's PrefixEncoders, the modules_to_save copies and the
hooks."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.prefix_tuning import hooks
from fastpeft.methods.prefix_tuning.config import PrefixTuningConfig
from fastpeft.methods.prefix_tuning.encoder import ATTRIBUTE, PrefixEncoder, PrefixEncoders
from fastpeft.methods.prefix_tuning.sites import Sites, find_sites
from fastpeft.methods.targets import find_saved_modules


@dataclass
class Plan:
    config: PrefixTuningConfig  # filled from the model, with the task heads
    sites: Sites
    saved: list[tuple[str, nn.Module]]  # modules_to_save
    dtype: torch.dtype  # of the prefixes
    device: torch.device


def encoders_of(model: nn.Module) -> PrefixEncoders | None:
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, PrefixEncoders) else None


def plan(model: nn.Module, config: PrefixTuningConfig, name: str, autocast_adapter_dtype: bool = True) -> Plan:
    """What adding adapter `name` takes; an error naming what does not fit, with the model unchanged."""
    if hasattr(model, ATTRIBUTE) and encoders_of(model) is None:
        raise ValueError(f"{type(model).__name__} has an attribute {ATTRIBUTE!r} of its own, where prefix tuning "
                         "keeps its prefixes")
    if encoders_of(model) is not None and name in encoders_of(model).encoders:
        raise ValueError(f"{type(model).__name__} already has prefixes named {name!r}")
    config = config.with_task_heads().for_model(model)
    sites = find_sites(model, config)
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype, device = (weight.dtype, weight.device) if weight is not None else (torch.float32, torch.device("cpu"))
    if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return Plan(config, sites, find_saved_modules(model, config), dtype, device)


def apply(model: nn.Module, planned: Plan, name: str, projection: bool) -> PrefixEncoder:
    """Put the planned adapter in (its prefixes trained through PEFT's MLP with `projection`, else plain), its
    modules_to_save copies and the hooks; returns its PrefixEncoder."""
    config = planned.config
    encoders = encoders_of(model)
    if encoders is None:
        encoders = PrefixEncoders().train(model.training)
        model.add_module(ATTRIBUTE, encoders)
    encoder = PrefixEncoder(config.num_virtual_tokens, config.num_layers, config.num_attention_heads, config.token_dim,
                            config.encoder_hidden_size if projection else None, config.init_weights == "zero",
                            planned.device, planned.dtype).train(model.training)
    encoders.encoders[name] = encoder
    saved_modules.wrap(model, planned.saved, name)
    hooks.install(model, planned.sites)
    return encoder


def remove(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s prefixes; with none left, the PrefixEncoders and the hooks go."""
    encoders = encoders_of(model)
    if encoders is None or name not in encoders.encoders:
        return
    del encoders.encoders[name]
    if encoders.active_adapter == name:
        encoders.active_adapter = None
    if not len(encoders.encoders):
        delattr(model, ATTRIBUTE)
        hooks.remove(model)
