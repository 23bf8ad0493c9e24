"""What the modules need to know of the linear layers they wrap: nn.Linear or transformers' GPT-2 `Conv1D`."""
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"base_layer must be an nn.Linear or transformers' Conv1D, got {type(module).__name__}")
