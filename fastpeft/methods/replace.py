"""Putting a wrapper (a LoRA layer, an adapter, a modules_to_save copy) in place of one of a model's modules."""
from torch import nn


def put_in(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at `path` by `new`, which takes over its train / eval mode: a fresh module is in training
    mode, so a wrapper put into a model in eval mode would otherwise run dropout at inference."""
    new.train(model.get_submodule(path).training)
    model.set_submodule(path, new)
