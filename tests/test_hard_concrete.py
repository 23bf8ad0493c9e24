"""HardConcreteGate: the sample's distribution against its closed forms (Monte Carlo with binomial bounds), the eval
gate, gradients (gradcheck in float64 and the analytic derivative of a sample), seeding, defaults, errors."""
import math

import pytest
import torch

from fastpeft.modules.hard_concrete import (HardConcreteGate, deterministic_gate, logistic_noise, probability_nonzero,
                                            sampled_gate)
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

SAMPLES = 200_000  # per (log_alpha, temperature, stretch): the standard error of a fraction is <= 0.0012


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def cdf(t: float, log_alpha: float, temperature: float, low: float, high: float) -> float:
    """P(z <= t) for t in [0, 1): z <= t iff s <= (t - l) / (r - l) iff logit(u) <= T logit((t - l) / (r - l)) - a."""
    return 1 / (1 + math.exp(-(temperature * logit((t - low) / (high - low)) - log_alpha)))


def assert_fraction(observed: torch.Tensor, p: float, what: str) -> None:
    """The fraction of True in `observed` lies within 5 binomial standard deviations (+ the U_EPS cut) of p."""
    n = observed.numel()
    bound = 5 * math.sqrt(max(p * (1 - p), 1 / n) / n) + 1e-5
    fraction = observed.double().mean().item()
    assert abs(fraction - p) <= bound, f"{what}: Monte-Carlo {fraction:.5f}, closed form {p:.5f} (bound {bound:.5f})"


@pytest.mark.parametrize("temperature, stretch", [(1.0, (-1.5, 1.5)), (2 / 3, (-0.1, 1.1)), (2.0, (-0.5, 3.0))])
@pytest.mark.parametrize("log_alpha", [-4.0, -0.7, 0.0, 0.3, 2.5, 8.0])
def test_sample_distribution_matches_closed_forms(log_alpha, temperature, stretch):
    torch.manual_seed(0)
    low, high = stretch
    gate = HardConcreteGate((SAMPLES,), temperature, stretch, log_alpha_init=log_alpha)  # SAMPLES i.i.d. gates
    with torch.no_grad():
        z = gate()
    assert ((z >= 0) & (z <= 1)).all()
    p_nonzero = gate.probability_nonzero()
    assert torch.allclose(p_nonzero, torch.full_like(p_nonzero, p_nonzero[0].item()))
    assert_fraction(z != 0, p_nonzero[0].item(), "P(z != 0)")
    assert_fraction(z == 1, 1 / (1 + math.exp(-(log_alpha - temperature * math.log((1 - low) / (high - 1))))),
                    "P(z == 1)")
    for t in (0.25, 0.5, 0.9):  # the continuous part
        assert_fraction(z <= t, cdf(t, log_alpha, temperature, low, high), f"P(z <= {t})")
    assert gate.expected_l0().item() == pytest.approx(SAMPLES * p_nonzero[0].item(), rel=1e-5)


def test_probability_nonzero_is_the_closed_form():
    log_alpha = torch.tensor([-3.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    gate = HardConcreteGate((4,), temperature=0.5, stretch=(-0.2, 1.6))
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha)
    expected = 1 / (1 + torch.exp(-(log_alpha - 0.5 * math.log(0.2 / 1.6))))
    torch.testing.assert_close(gate.probability_nonzero().double(), expected, rtol=1e-6, atol=0)
    # Symmetric stretch: log(-l / r) = 0, so P(z != 0) = sigmoid(log_alpha) at any temperature (the paper's penalty).
    symmetric = HardConcreteGate((4,), temperature=3.0, stretch=(-1.5, 1.5))
    with torch.no_grad():
        symmetric.log_alpha.copy_(log_alpha)
    torch.testing.assert_close(symmetric.probability_nonzero().double(), torch.sigmoid(log_alpha), rtol=1e-6, atol=0)


def test_eval_gate_is_deterministic_formula_and_draws_nothing():
    gate = HardConcreteGate((7,), temperature=0.5, stretch=(-0.1, 1.1)).eval()
    values = torch.tensor([-20.0, -2.5, -0.5, 0.0, 0.5, 2.5, 20.0])
    with torch.no_grad():
        gate.log_alpha.copy_(values)
    state = torch.get_rng_state()
    z = gate()
    assert torch.equal(torch.get_rng_state(), state)
    expected = (torch.sigmoid(values.double()) * 1.2 - 0.1).clamp(0, 1)  # no temperature at test time
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=1e-7)
    assert z[0] == 0 and z[-1] == 1 and 0 < z[3] < 1
    assert torch.equal(gate.deterministic(), z)


def test_default_init_opens_every_gate():
    """log_alpha = 5 (diff pruning's --alpha_init): P(z != 0) = sigmoid(5), and the eval gate is exactly 1."""
    gate = HardConcreteGate((3, 4))
    assert (gate.temperature, gate.stretch, gate.log_alpha_init) == (1.0, (-1.5, 1.5), 5.0)
    assert gate.log_alpha.dtype == torch.float32 and gate.log_alpha.requires_grad
    torch.testing.assert_close(gate.probability_nonzero(), torch.full((3, 4), 1 / (1 + math.exp(-5))))
    assert torch.equal(gate.eval()(), torch.ones(3, 4))


def test_scalar_gate():
    gate = HardConcreteGate((), log_alpha_init=0.0)
    assert gate.log_alpha.shape == () and gate().shape == () and gate.expected_l0().shape == ()
    assert gate.expected_l0().item() == pytest.approx(0.5)


def test_seed_repeats_the_sample():
    gate = HardConcreteGate((50,), log_alpha_init=0.0)
    torch.manual_seed(3)
    first = gate()
    torch.manual_seed(3)
    assert torch.equal(gate(), first)
    assert not torch.equal(gate(), first)  # the generator moved on


def test_noise_is_finite_and_logistic():
    torch.manual_seed(0)
    noise = logistic_noise(torch.empty(SAMPLES))
    assert torch.isfinite(noise).all() and noise.abs().max() <= math.log((1 - 1e-6) / 1e-6) + 1e-3
    assert_fraction(noise <= 1.0, 1 / (1 + math.exp(-1.0)), "logistic CDF at 1")


def test_gradcheck_deterministic_parts():
    torch.manual_seed(0)
    low, high = -1.5, 1.5
    log_alpha = torch.linspace(-2.9, 3.1, 9, dtype=torch.float64).requires_grad_()
    noise = logistic_noise(torch.empty(9, dtype=torch.float64))
    # Keep every gate off the clamp's corners (where it is not differentiable).
    for stretched in (torch.sigmoid((noise + log_alpha.detach()) / 0.8) * (high - low) + low,
                      torch.sigmoid(log_alpha.detach()) * (high - low) + low):
        assert ((stretched.abs() > 1e-3) & ((stretched - 1).abs() > 1e-3)).all()
    assert torch.autograd.gradcheck(lambda a: probability_nonzero(a, 0.8, low, high).sum(), (log_alpha,))
    assert torch.autograd.gradcheck(lambda a: sampled_gate(a, noise, 0.8, low, high), (log_alpha,))
    assert torch.autograd.gradcheck(lambda a: deterministic_gate(a, low, high), (log_alpha,))


def test_gradients_match_analytic_derivatives():
    """d expected_l0 / d log_alpha = p (1 - p); a sample's dz / d log_alpha = (r - l) s (1 - s) / T inside (0, 1),
    0 where clamped, with s read back from the same sample."""
    torch.manual_seed(1)
    temperature, low, high = 0.7, -0.4, 1.3
    gate = HardConcreteGate((4000,), temperature, (low, high), log_alpha_init=0.0)
    with torch.no_grad():
        gate.log_alpha.uniform_(-3, 3)
    gate.expected_l0().backward()
    p = gate.probability_nonzero().detach()
    torch.testing.assert_close(gate.log_alpha.grad, p * (1 - p))
    gate.log_alpha.grad = None
    z = gate()
    z.sum().backward()
    inside = (z > 0) & (z < 1)
    assert inside.any() and (~inside).any()
    s = (z.detach().double() - low) / (high - low)
    expected = torch.where(inside, (high - low) * s * (1 - s) / temperature, torch.zeros_like(s))
    torch.testing.assert_close(gate.log_alpha.grad.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1.0), r"temperature must be a finite number > 0, got -1.0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number, got nan"),
    (dict(temperature=True), r"temperature must be a finite number > 0, got True"),
    (dict(stretch=(0.0, 1.5)), r"stretch must be a pair \(l, r\) with l < 0 and r > 1, got \(0.0, 1.5\)"),
    (dict(stretch=(-0.1, 1.0)), r"stretch must be a pair \(l, r\) with l < 0 and r > 1, got \(-0.1, 1.0\)"),
    (dict(stretch=(-0.1, 1.1, 2.0)), r"stretch must be a pair \(l, r\)"),
    (dict(stretch=1.5), r"stretch must be a pair \(l, r\)"),
    (dict(stretch=(-0.1, float("inf"))), r"stretch must be a finite number, got inf"),
    (dict(log_alpha_init=float("inf")), r"log_alpha_init must be a finite number, got inf"),
    (dict(log_alpha_init="5"), r"log_alpha_init must be a finite number, got '5'"),
    (dict(shape=(3, -1)), r"shape must be a tuple of ints >= 0 \(\(\) for one gate\), got \(3, -1\)"),
    (dict(shape=4), r"shape must be a tuple of ints >= 0"),
    (dict(shape=(2.0,)), r"shape must be a tuple of ints >= 0"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HardConcreteGate(**{"shape": (2,), **kwargs})


def test_extra_repr():
    text = repr(HardConcreteGate((2, 3), temperature=0.5, stretch=(-0.1, 1.1), log_alpha_init=2.0))
    assert "shape=(2, 3), temperature=0.5, stretch=(-0.1, 1.1), log_alpha_init=2" in text
