"""LoRA input dropout: reproducible from its seed, unbiased keep rate, identical masks on every backend."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import examples
from fastpeft.ops.dropout import keep_mask, keep_threshold
from fastpeft.ops.lora import lora_linear

BACKENDS = ["reference", "torch", "ext", "triton"]


def identity_lora(k: int, dtype=torch.float32):
    """weight 0 and A = B = I, so the op returns dropout(x) itself."""
    eye = torch.eye(k, dtype=dtype)
    return torch.zeros(k, k, dtype=dtype), None, eye, eye.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(backend, p):
    rows, k = (48, 32) if backend == "triton" else (512, 64)
    x = torch.ones(rows, k)
    y = lora_linear(x, *identity_lora(k), 1.0, p, training=True, seed=1234, backend=backend)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # inverted-dropout scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_other_seed_other_mask(backend):
    x = torch.randn(16, 24)
    args = (*identity_lora(24), 1.0, 0.3)
    first = lora_linear(x, *args, training=True, seed=7, backend=backend)
    again = lora_linear(x, *args, training=True, seed=7, backend=backend)
    other = lora_linear(x, *args, training=True, seed=8, backend=backend)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, other != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_uses_the_shared_mask(backend):
    x = torch.randn(20, 40) + 3.0  # no zeros, so y == 0 exactly where dropped
    y = lora_linear(x, *identity_lora(40), 1.0, 0.4, training=True, seed=99, backend=backend)
    assert torch.equal(y != 0, keep_mask(99, 20, 40, 0.4))


def test_eval_mode_applies_no_dropout():
    x = torch.randn(8, 16)
    y = lora_linear(x, *identity_lora(16), 1.0, 0.5, training=False)
    torch.testing.assert_close(y, x)


def test_seed_drawn_from_torch_generator_when_not_given():
    x = torch.randn(8, 16)
    torch.manual_seed(0)
    a = lora_linear(x, *identity_lora(16), 1.0, 0.5)
    torch.manual_seed(0)
    b = lora_linear(x, *identity_lora(16), 1.0, 0.5)
    assert torch.equal(a, b)


@examples(30)
@given(p=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 2))
def test_mask_keep_probability_is_one_minus_p(p, seed):
    assert keep_threshold(p) == min(int(p * 2**32), 2**32 - 1)
    mask = keep_mask(seed, 64, 64, p)
    n = mask.numel()
    assert abs(mask.float().mean().item() - (1 - p)) <= 5 * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1 / n
