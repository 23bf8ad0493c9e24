"""Every LoRA backend against the float64 reference: forward and all gradients (hypothesis properties)."""
import pytest
import torch
from hypothesis import given

from budget import examples

from lora_cases import LoraCase, check_backend, lora_cases


@pytest.mark.parametrize("backend", ["torch", "ext"])
@examples(60)
@given(case=lora_cases())
def test_cpu_backends_match_reference(backend, case):
    check_backend(backend, case)


@examples(25)
@given(case=lora_cases(max_m=24, max_kn=24, max_r=20))
def test_triton_interpreted_matches_reference(case):
    check_backend("triton", case)


@pytest.mark.parametrize("m", [1, 7, 65, 130])  # both sides of the one-launch decode path
def test_triton_row_counts(m):
    from lora_cases import LoraCase

    for dtype, p in [(torch.float32, 0.0), (torch.bfloat16, 0.25)]:
        check_backend("triton", LoraCase((), m, 20, 24, 5, dtype, True, p, "contiguous", False, True, 2.0, m))


@examples(6)
@given(case=lora_cases(max_m=6, max_kn=8, min_r=21, max_r=64))
def test_triton_padded_ranks_match_reference(case):
    """Ranks 21..64 run padded to 32 or 64 with the padding masked off, forward and backward (tiny shapes: the
    interpreter is slow)."""
    check_backend("triton", case)


@pytest.mark.parametrize("backend", ["reference", "torch", "ext", "triton"])
@pytest.mark.parametrize("frozen", [("x",), ("x", "lora_a"), ("x", "lora_b")], ids=["first-layer", "B-only", "A-only"])
@pytest.mark.parametrize("dtype, dropout_p", [(torch.float32, 0.0), (torch.float32, 0.3), (torch.bfloat16, 0.3)])
def test_inputs_that_need_no_gradient(backend, frozen, dtype, dropout_p):
    """A model's first layer (x needs no gradient; fp32 without dropout takes the torch backends' folded path) and
    LoRA with only A or only B trainable: forward, dA and dB against the reference, no gradient where none is asked."""
    check_backend(backend, LoraCase((2,), 20, 12, 10, 3, dtype, True, dropout_p, "contiguous", False, False, 1.5, 7,
                                    frozen))


def test_empty_batch_returns_empty_output():
    from fastpeft.ops.lora import lora_linear

    x = torch.zeros(0, 4, requires_grad=True)
    y = lora_linear(x, torch.randn(3, 4), None, torch.randn(2, 4, requires_grad=True), torch.randn(3, 2), 1.0)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 4)


@pytest.mark.gpu
@examples(60)
@given(case=lora_cases(max_m=300, max_kn=300))
def test_triton_on_gpu_matches_reference(case):
    check_backend("triton", case, device="cuda")
