"""`FrozenFeatures`: a frozen part of the model (e.g. the encoder under a trained classifier head) that runs in eval
mode (no dropout), whatever mode the model is in, and under torch.no_grad: autograd keeps none of its activations
and the backward stops at its output. Where a trained module runs before it (an input requires grad), it runs with
autograd on instead, so that the gradient reaches that module; its own weights still get none."""
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fastpeft.methods.frozen_features.cache import FeatureCache


class FrozenFeatures(nn.Module):
    def __init__(self, base_layer: nn.Module, cache_size: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.cache = FeatureCache(cache_size) if cache_size else None
        self.disabled = False  # True: the base layer runs as in the plain model (its mode, autograd on)
        self.train(base_layer.training)

    def train(self, mode: bool = True):
        """The wrapper's mode follows the model's; the frozen part stays in eval mode unless disabled."""
        self.training = mode
        self.base_layer.train(mode and self.disabled)
        return self

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self.train(self.training)

    def forward(self, *args, **kwargs):
        if self.disabled or (torch.is_grad_enabled() and any(
                isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in tree_leaves((args, kwargs)))):
            return self.base_layer(*args, **kwargs)
        key = self.cache.key(args, kwargs) if self.cache is not None else None
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            return cached
        with torch.no_grad():
            outputs = self.base_layer(*args, **kwargs)
        if key is not None:
            self.cache.put(key, outputs)
        return outputs

    def __getattr__(self, name: str):
        """Attributes of the frozen module (`config`, `token_type_ids`, ...) read through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def frozen_layers(model: nn.Module) -> list[tuple[str, FrozenFeatures]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, FrozenFeatures)]


def frozen_parts(model: nn.Module, heads: list[str]) -> list[tuple[str, nn.Module]]:
    """(path, module) of the largest modules that hold parameters and no head (module lists, which are not called,
    are opened). Parameters held directly by a module around a head stay frozen but unwrapped."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = prefix + child_name
            if path in heads or next(child.parameters(), None) is None:
                continue
            if any(head.startswith(path + ".") for head in heads) or isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(path + ".", child)
            else:
                found.append((path, child))
    visit("", model)
    return found
