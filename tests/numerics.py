"""The one tolerance table of the test suite (DESIGN.md "Numerics").

A fast path's error against the float64 reference may be at most twice the error of the same computation done
by PyTorch in the input dtype, plus a slack of a few units in the last place of the dtype, taken relative to the
same computation on absolute values (the scale of the classic rounding-error bound): where a sum cancels, a lucky
PyTorch rounding must not make the budget vanish."""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(name: str, actual, exact, in_dtype_torch, dtype, scale) -> None:
    """`actual` (fast path) and `in_dtype_torch` (plain PyTorch in `dtype`) both against `exact` (float64);
    `scale` is the float64 result of the computation on absolute values."""
    assert actual is not None, f"{name}: gradient missing"
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    magnitude = max(1.0, scale.abs().max().item()) if scale.numel() else 1.0
    err, budget = max_error(actual, exact), 2 * max_error(in_dtype_torch, exact) + ATOL[dtype] * magnitude
    assert err <= budget, f"{name}: max error {err:.3g} exceeds {budget:.3g} (2x PyTorch-{dtype} error + atol)"
