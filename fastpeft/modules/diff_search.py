"""`DiffSearchLinear`: diff pruning's search stage (Guo, Rush & Kim 2021) on one nn.Linear or GPT-2 Conv1D.

The layer runs the base linear with W0 + z * diff: `diff` a dense fp32 task diff, `z` hard-concrete L0 gates
(sampled in training, deterministic in eval), optionally times one group gate per weight tensor (the paper's
structured diff pruning). `expected_l0()` is the differentiable penalty; `gated_diff()` is what projection ranks.

Memory: stage 1 is dense, as in the paper. diff and log_alpha, their gradients and Adam moments are six fp32
tensors of the weight's size (24 bytes per weight entry, 12x a bf16 weight), and each step adds weight-sized
temporaries (z, the merged weight). The fixed-mask stage 2 (`SparseDeltaLinear`) is what costs O(nnz).
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.modules.hard_concrete import HardConcreteGate, check_gate_options
from fastpeft.modules.linear import is_conv1d, linear_features
from fastpeft.ops import checks


class DiffSearchLinear(nn.Module):
    """Wraps `base_layer` (shared, not copied, frozen). `diff` and `gate` have the *stored* weight's shape
    (Conv1D: [in, out]); `group_gate` is a scalar gate when `structured`, else None."""

    def __init__(self, base_layer: nn.Module, temperature: float = 1.0, stretch: tuple = (-1.5, 1.5),
                 log_alpha_init: float = 5.0, structured: bool = False):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError("DiffSearchLinear wraps nn.Linear or transformers' Conv1D, "
                            f"got {type(base_layer).__name__}")
        weight = base_layer.weight
        checks.check_tensor("base_layer.weight", weight, dim=2)
        if not weight.is_contiguous():  # found now, not after the search, when the fixed mask needs it
            raise ValueError("base_layer.weight must be contiguous (the fixed mask's indices are flat positions in it)")
        if not isinstance(structured, bool):
            raise TypeError(f"structured must be a bool, got {structured!r}")
        check_gate_options(temperature, stretch, log_alpha_init)  # before anything is changed
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.disabled = False  # True: the base layer alone runs (disable_adapters)
        self.fan_in_fan_out = is_conv1d(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.diff = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        self.gate = HardConcreteGate(tuple(weight.shape), temperature, stretch, log_alpha_init, device=weight.device)
        self.group_gate = (HardConcreteGate((), temperature, stretch, log_alpha_init, device=weight.device)
                           if structured else None)

    @property
    def structured(self) -> bool:
        return self.group_gate is not None

    def gate_values(self) -> torch.Tensor:
        """z of the stored weight's shape: element gates (times the group gate when structured), mode-dependent."""
        z = self.gate()
        return z if self.group_gate is None else z * self.group_gate()

    def expected_l0(self) -> torch.Tensor:
        """The expected number of nonzero diff entries, a 0-d tensor: sum_i P(z_i != 0), times P(z_group != 0)
        when structured (the paper's structured penalty, z_i and z_group independent)."""
        l0 = self.gate.expected_l0()
        return l0 if self.group_gate is None else l0 * self.group_gate.probability_nonzero()

    @torch.no_grad()
    def gated_diff(self) -> torch.Tensor:
        """The deterministic (eval-mode) gate times diff, fp32, detached, the stored weight's shape."""
        z = self.gate.deterministic()
        if self.group_gate is not None:
            z = z * self.group_gate.deterministic()
        return z * self.diff.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        w0 = self.base_layer.weight
        checks.check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dimension must equal in_features {self.in_features}, "
                             f"got x of shape {tuple(x.shape)}")
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear / addmm cast both to its dtype
            checks.check_same("x", x, weight=w0)
        # W0 + z * diff summed in fp32 and rounded once (w0.float() is w0 itself in fp32: addcmul never writes it).
        merged = torch.addcmul(w0.float(), self.gate_values(), self.diff).to(w0.dtype)
        if not self.fan_in_fan_out:
            return F.linear(x, merged, self.base_layer.bias)
        # Conv1D's own formula on its [in, out] weight (its bias always exists), so a zero diff gives its bits.
        out = torch.addmm(self.base_layer.bias, x.reshape(-1, self.in_features), merged)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, shape={tuple(self.diff.shape)}, "
                f"temperature={self.gate.temperature:g}, stretch=({self.gate.low:g}, {self.gate.high:g}), "
                f"structured={self.structured}")
