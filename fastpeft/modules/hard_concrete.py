"""Hard-concrete gates (Louizos, Welling & Kingma 2018): stochastic gates in [0, 1] that are exactly 0 or 1 with
positive probability, reparameterised so that a gradient reaches `log_alpha`, with a closed-form expected L0.

A gate draws u ~ U(0, 1), s = sigmoid((logit(u) + log_alpha) / temperature), stretches s to (l, r) and clamps it
to [0, 1]. Then P(z != 0) = sigmoid(log_alpha - temperature * log(-l / r)), the expected-L0 penalty's term.

Defaults follow diff pruning (Guo, Rush & Kim 2021) and its public code (github.com/dguo98/DiffPruning,
examples/run_glue_diffpruning.py): stretch (-1.5, 1.5) (`--concrete_lower -1.5 --concrete_upper 1.5`);
temperature 1 (`--temp 1.0`, and its sampler has no temperature at all, i.e. 1); log_alpha init 5 (`--alpha_init 5`:
P(z != 0) = sigmoid(5) ~ 0.993, so the search starts with every diff entry on). Louizos et al. used (-0.1, 1.1) and 2/3.
"""
import math

import torch
from torch import nn

from fastpeft.ops import checks

# u is kept in [U_EPS, 1 - U_EPS] so logit(u) stays finite (|logit| <= 13.8); the cut changes each gate's
# distribution by at most 2e-6 in probability, far below what a Monte-Carlo estimate can see (diff pruning's code
# cuts at 1e-4).
U_EPS = 1e-6


def check_gate_options(temperature, stretch, log_alpha_init=0.0) -> tuple[float, float, float, float]:
    """Validated (temperature, l, r, log_alpha_init): temperature > 0, l < 0 < 1 < r, all finite."""
    if isinstance(temperature, bool) or checks.check_finite("temperature", temperature) <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(stretch, (tuple, list)) or len(stretch) != 2:
        raise ValueError(f"stretch must be a pair (l, r) with l < 0 and r > 1, got {stretch!r}")
    low, high = (checks.check_finite("stretch", v) for v in stretch)
    if not (low < 0 and high > 1):
        raise ValueError(f"stretch must be a pair (l, r) with l < 0 and r > 1, got {tuple(stretch)!r}")
    return float(temperature), low, high, checks.check_finite("log_alpha_init", log_alpha_init)


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """logit(u), u ~ U(0, 1) drawn from torch's generator (so torch.manual_seed repeats it), shaped like `like`,
    in at least fp32 (1 - U_EPS must not round to 1)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.rand(like.shape, dtype=dtype, device=like.device).clamp_(U_EPS, 1 - U_EPS).logit_()


class SampledGate(torch.autograd.Function):
    """z = clamp(sigmoid((noise + log_alpha) / T) (r - l) + l, 0, 1), computed in place in one buffer and saving
    only z: inside (0, 1), dz / d log_alpha = (r - l) s (1 - s) / T = (z - l) (r - z) / ((r - l) T), and 0 where
    clamped. Autograd's generic graph saves s and the unclamped value instead: twice the memory, and forward +
    backward measured 1.6x slower on one CPU thread at 768x768 and 2048x2048 gates."""

    @staticmethod
    def forward(ctx, log_alpha, noise, temperature, low, high):
        z = (noise + log_alpha).div_(temperature).sigmoid_().mul_(high - low).add_(low).clamp_(0.0, 1.0)
        ctx.save_for_backward(z)
        ctx.constants = (temperature, low, high)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        (z,) = ctx.saved_tensors
        temperature, low, high = ctx.constants
        slope = (z - low).mul_(high - z).div_((high - low) * temperature).masked_fill_((z <= 0) | (z >= 1), 0.0)
        return grad_z * slope, None, None, None, None


def sampled_gate(log_alpha, noise, temperature: float, low: float, high: float) -> torch.Tensor:
    """The reparameterised sample: clamp(sigmoid((noise + log_alpha) / temperature) (r - l) + l, 0, 1)."""
    return SampledGate.apply(log_alpha, noise, temperature, low, high)


def deterministic_gate(log_alpha, low: float, high: float) -> torch.Tensor:
    """The test-time gate of Louizos et al.: clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0.0, 1.0)


def probability_nonzero(log_alpha, temperature: float, low: float, high: float) -> torch.Tensor:
    """P(z != 0) = P(s > -l / (r - l)) = sigmoid(log_alpha - temperature * log(-l / r))."""
    return torch.sigmoid(log_alpha - temperature * math.log(-low / high))


class HardConcreteGate(nn.Module):
    """Gates of `shape` (`()` for one scalar gate), each with its own `log_alpha` (fp32). `forward()` samples in
    training mode and returns the deterministic gate in eval mode; `expected_l0()` is differentiable."""

    def __init__(self, shape: tuple, temperature: float = 1.0, stretch: tuple = (-1.5, 1.5),
                 log_alpha_init: float = 5.0, device=None):
        super().__init__()
        if not isinstance(shape, (tuple, list, torch.Size)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"shape must be a tuple of ints >= 0 (() for one gate), got {shape!r}")
        self.temperature, self.low, self.high, self.log_alpha_init = check_gate_options(
            temperature, stretch, log_alpha_init)
        self.log_alpha = nn.Parameter(torch.empty(tuple(shape), dtype=torch.float32, device=device))
        self.reset_parameters()

    @property
    def stretch(self) -> tuple[float, float]:
        return self.low, self.high

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_alpha.fill_(self.log_alpha_init)

    def forward(self) -> torch.Tensor:
        if self.training:
            return sampled_gate(self.log_alpha, logistic_noise(self.log_alpha), self.temperature, self.low, self.high)
        return self.deterministic()

    def deterministic(self) -> torch.Tensor:
        """The eval-mode gate, whatever the mode: clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)."""
        return deterministic_gate(self.log_alpha, self.low, self.high)

    def probability_nonzero(self) -> torch.Tensor:
        """P(z != 0) per gate, differentiable w.r.t. log_alpha."""
        return probability_nonzero(self.log_alpha, self.temperature, self.low, self.high)

    def expected_l0(self) -> torch.Tensor:
        """The expected number of nonzero gates, a 0-d tensor (the L0 penalty)."""
        return self.probability_nonzero().sum()

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.log_alpha.shape)}, temperature={self.temperature:g}, "
                f"stretch=({self.low:g}, {self.high:g}), log_alpha_init={self.log_alpha_init:g}")
