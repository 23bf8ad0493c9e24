"""Where bottleneck adapters go in BERT-style or Llama-style transformer layers (`sites`), by placement:
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
A model holds at most one bottleneck adapter."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.modules.adapter import BottleneckAdapter, ParallelAdapter, SerialAdapter

SHOW_TYPES = 12  # how many module types an unknown-architecture error lists


class BertParallelOutput(nn.Module):
    """BertOutput (dense, dropout, LayerNorm) with a parallel adapter beside the FFN, which reads the FFN input."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False  # True: the base layer alone runs (disable_adapters)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(hidden_states, input_tensor)
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
    """The submodule at `names` is an nn.Linear, or another method's layer around one (so that the layer is still
    found, and the registry's overlap rule names both methods where they meet)."""
    for name in names:
        module = getattr(module, name, None)
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _is_bert_layer(layer: nn.Module) -> bool:
    return (_linear(layer, "attention", "output", "dense") and _linear(layer, "intermediate", "dense")
            and _linear(layer, "output", "dense") and isinstance(getattr(layer.output, "LayerNorm", None), nn.Module)
            and isinstance(getattr(layer.output, "dropout", None), nn.Module)
            and isinstance(getattr(layer.attention.output, "dropout", None), nn.Module))


def _is_llama_layer(layer: nn.Module) -> bool:
    return _linear(layer, "self_attn", "o_proj") and _linear(layer, "mlp", "down_proj")


def adapter_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, wrapper) of every bottleneck adapter in the model."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, WRAPPERS)]
