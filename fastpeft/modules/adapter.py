"""Bottleneck adapters: `BottleneckAdapter` computes residual + scaling * up(act(down(dropout(h)))) through the fused
op; `SerialAdapter` runs one on a layer's output, `ParallelAdapter` beside a layer (reading its input).

Parameters are two nn.Linear, so their weights have the op's shapes: down.weight [m, d], up.weight [d, m]."""
import torch
from torch import nn

from fastpeft import backends
from fastpeft.ops import checks
from fastpeft.ops.adapter import ACTIVATIONS, bottleneck_adapter

INITS = ("near-identity", "zero-up")
# Houlsby et al. (2019, sec. 3.6) initialise adapters near the identity with zero-mean Gaussian weights, std 1e-2
# truncated at 2 std, and report stable results up to that std and degradation above it. With zero biases the
# adapter output is then about 1% of its input for BERT-sized widths, so training starts from the base model.
NEAR_IDENTITY_STD = 1e-2


def check_size_options(bottleneck, reduction_factor) -> None:
    """Exactly one of `bottleneck` (an int >= 1) and `reduction_factor` (a number >= 1)."""
    if (bottleneck is None) == (reduction_factor is None):
        raise ValueError(f"give exactly one of bottleneck and reduction_factor, got bottleneck={bottleneck!r}, "
                         f"reduction_factor={reduction_factor!r}")
    if bottleneck is not None and (isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1):
        raise ValueError(f"bottleneck must be an int >= 1, got {bottleneck!r}")
    if reduction_factor is not None and (isinstance(reduction_factor, bool) or
                                         not isinstance(reduction_factor, (int, float)) or
                                         not 1 <= reduction_factor < float("inf")):
        raise ValueError(f"reduction_factor must be a finite number >= 1, got {reduction_factor!r}")


class BottleneckAdapter(nn.Module):
    """h -> residual + scaling * up(act(down(dropout(LN(h))))), residual = h unless given (LN only if `layer_norm`).
    `init="zero-up"` starts as the exact identity, `"near-identity"` close to it (see NEAR_IDENTITY_STD)."""

    def __init__(self, d: int, bottleneck: int | None = None, reduction_factor: float | None = None,
                 activation: str = "relu", init: str = "near-identity", dropout: float = 0.0, scaling: float = 1.0,
                 layer_norm: bool = False, device=None, dtype=None):
        super().__init__()
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d (the adapter's input width) must be an int >= 1, got {d!r}")
        check_size_options(bottleneck, reduction_factor)
        m = bottleneck if bottleneck is not None else int(d // reduction_factor)
        if m < 1:
            raise ValueError(f"reduction_factor={reduction_factor!r} leaves no bottleneck for width d={d}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.activation = activation
        self.dropout = checks.check_probability("dropout", dropout)
        self.scaling = checks.check_finite("scaling", scaling)
        self.layer_norm = nn.LayerNorm(d, device=device, dtype=dtype) if layer_norm else None
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "near-identity") -> None:
        std = NEAR_IDENTITY_STD
        nn.init.trunc_normal_(self.down.weight, std=std, a=-2 * std, b=2 * std)
        if init == "zero-up":
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.trunc_normal_(self.up.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if self.layer_norm is not None:
            self.layer_norm.reset_parameters()

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_norm is not None:
            h, residual = self.layer_norm(h), h if residual is None else residual
        return bottleneck_adapter(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                  activation=self.activation, scaling=self.scaling, residual=residual,
                                  dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"d={self.down.in_features}, bottleneck={self.down.out_features}, activation={self.activation}, "
                f"dropout={self.dropout:g}, scaling={self.scaling:g}, backend={backends.requested()}")


class SerialAdapter(nn.Module):
    """`base_layer` followed by an adapter on its output: y + scaling * adapter_branch(y), y = base_layer(x)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False  # True: the base layer alone runs (disable_adapters)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(*args, **kwargs)
        return y if self.disabled else self.adapter(y)


class ParallelAdapter(nn.Module):
    """An adapter beside `base_layer`: base_layer(x) + scaling * adapter_branch(x) (He et al. 2022)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False  # True: the base layer alone runs (disable_adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y if self.disabled else self.adapter(x, residual=y)
