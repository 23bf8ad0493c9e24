"""Where multi-task heads sit in a model: one `MultiTaskHeads` submodule, `model.multitask_heads`."""
from torch import nn

from fastpeft.methods.multitask.heads import MultiTaskHeads

PATH = "multitask_heads"


def heads_of(model: nn.Module) -> MultiTaskHeads:
    """The model's multi-task heads (found anywhere inside `model`, e.g. an encoder inside a larger module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, MultiTaskHeads):
            return module
    raise ValueError(f"{type(model).__name__} has no multi-task heads: inject a MultiTaskConfig (or load_adapter a "
                     "saved multitask adapter) first")
