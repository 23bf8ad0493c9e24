"""Put bottleneck adapters into BERT-style or Llama-style transformer layers (`inject_adapters`), freeze the rest.

Where each placement puts them (`sites`):
  BERT layer  (attention.output.dense + dropout, intermediate, output.dense + dropout + LayerNorm):
    houlsby   SerialAdapter on attention.output.dropout and on output.dropout: after the projection's dropout,
              before the residual add + norm, as in Houlsby et al.'s adapter-bert
    pfeiffer  SerialAdapter on output.dropout
    parallel  output -> BertParallelOutput: the adapter reads the FFN input (BertOutput's input_tensor) and is added
              to the FFN output (dropout(dense(intermediate))) before the residual add and LayerNorm
  Llama layer (self_attn.o_proj, mlp.down_proj):
    houlsby   SerialAdapter on self_attn.o_proj and on mlp.down_proj (before the residual add)
    pfeiffer  SerialAdapter on mlp.down_proj
    parallel  mlp -> ParallelAdapter: mlp(x) + scaling * adapter_branch(x)
A model holds at most one bottleneck adapter and no LoRA adapter beside it."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.model.adapter_config import AdapterConfig
from fastpeft.model.replace import put_in
from fastpeft.model.saved_module import ModulesToSave
from fastpeft.model.targets import find_saved_modules
from fastpeft.model.validate import check_inject_args
from fastpeft.modules.adapter import BottleneckAdapter, ParallelAdapter, SerialAdapter
from fastpeft.modules.lora import LoraLinear

REGISTRY = "_fastpeft_bottleneck"  # model attribute: {adapter name: AdapterConfig}, at most one entry
SHOW_TYPES = 12  # how many module types an unknown-architecture error lists


class BertParallelOutput(nn.Module):
    """BertOutput (dense, dropout, LayerNorm) with a parallel adapter beside the FFN, which reads the FFN input."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = self.base_layer
        ffn = self.adapter(input_tensor, residual=out.dropout(out.dense(hidden_states)))
        return out.LayerNorm(ffn + input_tensor)


WRAPPERS = (SerialAdapter, ParallelAdapter, BertParallelOutput)


@dataclass(frozen=True)
class Site:
    """A module to wrap (at `path`), the wrapper class, and the projection whose output width, dtype and device
    the adapter takes."""

    path: str
    module: nn.Module
    wrapper: type
    projection: nn.Linear


def sites(model: nn.Module, placement: str) -> list[Site]:
    """Where `placement` puts adapters in `model`; a clear error for architectures without known layers."""
    found = []
    for path, layer in model.named_modules():
        prefix = f"{path}." if path else ""
        if _is_bert_layer(layer):
            attention, ffn_out = layer.attention.output, layer.output
            if placement == "houlsby":
                found.append(Site(prefix + "attention.output.dropout", attention.dropout, SerialAdapter,
                                  attention.dense))
            if placement in ("houlsby", "pfeiffer"):
                found.append(Site(prefix + "output.dropout", ffn_out.dropout, SerialAdapter, ffn_out.dense))
            else:
                found.append(Site(prefix + "output", layer.output, BertParallelOutput, ffn_out.dense))
        elif _is_llama_layer(layer):
            o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
            if placement == "houlsby":
                found.append(Site(prefix + "self_attn.o_proj", o_proj, SerialAdapter, o_proj))
            if placement in ("houlsby", "pfeiffer"):
                found.append(Site(prefix + "mlp.down_proj", down_proj, SerialAdapter, down_proj))
            else:
                found.append(Site(prefix + "mlp", layer.mlp, ParallelAdapter, down_proj))
    if not found:
        types = list(dict.fromkeys(type(m).__name__ for m in model.modules()
                                   if not type(m).__module__.startswith("torch.nn")))
        raise ValueError(f"bottleneck adapters know BERT-style layers (attention.output.dense, intermediate, "
                         f"output.dense, output.LayerNorm) and Llama-style decoder layers (self_attn.o_proj, "
                         f"mlp.down_proj); {type(model).__name__} has neither. Its module types: "
                         f"{types[:SHOW_TYPES]}{' ...' if len(types) > SHOW_TYPES else ''}")
    return found


def _linear(module: nn.Module, *names: str) -> bool:
    for name in names:
        module = getattr(module, name, None)
    return isinstance(module, nn.Linear)


def _is_bert_layer(layer: nn.Module) -> bool:
    return (_linear(layer, "attention", "output", "dense") and _linear(layer, "intermediate", "dense")
            and _linear(layer, "output", "dense") and isinstance(getattr(layer.output, "LayerNorm", None), nn.Module)
            and isinstance(getattr(layer.output, "dropout", None), nn.Module)
            and isinstance(getattr(layer.attention.output, "dropout", None), nn.Module))


def _is_llama_layer(layer: nn.Module) -> bool:
    return _linear(layer, "self_attn", "o_proj") and _linear(layer, "mlp", "down_proj")


def bottleneck_names(model: nn.Module) -> list[str]:
    return list(getattr(model, REGISTRY, {}))


def bottleneck_config(model: nn.Module, name: str) -> AdapterConfig:
    configs = getattr(model, REGISTRY, {})
    if name not in configs:
        raise ValueError(f"unknown adapter_name {name!r}: the model's bottleneck adapters are {sorted(configs)}")
    return configs[name]


def adapter_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, wrapper) of every bottleneck adapter in the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, WRAPPERS)]


@dataclass
class Plan:
    """Wrappers ready to go in (`path -> wrapper`) and modules_to_save wrappers; built without touching the model."""

    wrappers: dict[str, nn.Module]
    saved: dict[str, ModulesToSave]


def check_new(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
    check_inject_args(model, config, AdapterConfig, adapter_name)
    if bottleneck_names(model):
        raise ValueError(f"the model already has bottleneck adapter {bottleneck_names(model)[0]!r}; a model holds "
                         "one (start again from the base model to use another)")
    if any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules()):
        raise ValueError("the model already holds fastpeft LoRA adapters; bottleneck adapters go into a model "
                         "without them")


def plan(model: nn.Module, config: AdapterConfig, adapter_name: str) -> Plan:
    """Build the adapters `config` puts into `model` (freshly initialised) and the modules_to_save copies."""
    check_new(model, config, adapter_name)
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
        saved_wrappers[path] = ModulesToSave(module)
        saved_wrappers[path].add_adapter(adapter_name)
    return Plan(wrappers, saved_wrappers)


def apply(model: nn.Module, config: AdapterConfig, adapter_name: str, planned: Plan) -> nn.Module:
    """Put the planned modules in, train only the adapters and the modules_to_save copies, record the config."""
    for path, module in {**planned.wrappers, **planned.saved}.items():
        put_in(model, path, module)
    for p in model.parameters():
        p.requires_grad_(False)
    for wrapper in planned.wrappers.values():
        wrapper.adapter.requires_grad_(True)
    for wrapper in planned.saved.values():
        wrapper.modules_to_save[adapter_name].requires_grad_(True)
    setattr(model, REGISTRY, {adapter_name: config})
    return model


def inject_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Put `config`'s bottleneck adapters into `model` (see the module docstring for where) and freeze all else."""
    return apply(model, config, adapter_name, plan(model, config, adapter_name))



def refuse_lora(model: nn.Module) -> None:
    """LoRA adapters do not go into a model that holds a bottleneck adapter."""
    if bottleneck_names(model):
        raise ValueError(f"the model holds bottleneck adapter {bottleneck_names(model)[0]!r}; LoRA adapters go into "
                         "a model without one")


def refuse_merge(model: nn.Module) -> None:
    """Bottleneck adapters cannot be merged: a clear error instead of silently merging nothing."""
    if bottleneck_names(model):
        raise ValueError(f"bottleneck adapter {bottleneck_names(model)[0]!r} cannot be merged into the base weights: "
                         "it adds scaling * up(act(down(y))), a nonlinear function of the layer output y, not a "
                         "change of any weight. Keep the adapter modules (save_adapter / load_adapter) instead")
