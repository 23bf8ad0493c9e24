"""The fused ops under torch.autocast("cpu", bfloat16) behave as nn.Linear there: they compute on bf16 casts of
their inputs and return bf16 within the bf16 budget of the float64 reference, give fp32 leaves fp32 gradients, and
save for backward what bf16 inputs would save, so no fp32 copy of the input."""
import pytest
import torch

from bench.common import saved_bytes
from fastpeft.ops.adapter import bottleneck_adapter, bottleneck_adapter_ref
from fastpeft.ops.lora import lora_linear, lora_linear_ref
from fastpeft.ops.sparse_delta import scatter_delta_, sparse_delta_linear, sparse_delta_linear_ref
from numerics import assert_close_to_reference

BF16 = torch.bfloat16
ROWS, D_IN, D_OUT, RANK = 37, 48, 40, 8  # an odd row count: no row block divides it
P, SEED = 0.25, 7  # dropout, its mask shared by the fused op and the reference
INDICES = torch.tensor([3, 50, 51, 400, 977, 1500, D_IN * D_OUT - 1], dtype=torch.int32)


def _lora():
    def fast(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 2.0, P, True, SEED)

    def ref(x, w, b, a, bb):
        return lora_linear_ref(x, w, b, a, bb, 2.0, P, SEED)

    return fast, ref, [(2, ROWS, D_IN), (D_OUT, D_IN), (D_OUT,), (RANK, D_IN), (D_OUT, RANK)], (2, ROWS, D_OUT)


def _adapter(with_residual: bool):
    def fast(h, wd, bd, wu, bu, *residual):
        return bottleneck_adapter(h, wd, bd, wu, bu, "gelu", 0.5, *residual, dropout_p=P, seed=SEED)

    def ref(h, wd, bd, wu, bu, *residual):
        return bottleneck_adapter_ref(h, wd, bd, wu, bu, "gelu", 0.5, *residual, dropout_p=P, seed=SEED)

    shapes = [(2, ROWS, D_IN), (RANK, D_IN), (RANK,), (D_IN, RANK), (D_IN,)] + [(2, ROWS, D_IN)] * with_residual
    return fast, ref, shapes, (2, ROWS, D_IN)


def _sparse_delta():
    w0 = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(1)).to(BF16) / D_IN**0.5  # frozen

    def fast(x, b, values):  # as SparseDeltaLinear runs it: W0 + delta scattered into the weight
        weight = w0.to(x.dtype, copy=True)
        scatter_delta_(weight, weight.flatten()[INDICES.long()], values.detach(), INDICES)
        return sparse_delta_linear(x, weight, b, values, INDICES)

    def ref(x, b, values):
        return sparse_delta_linear_ref(x, w0.to(x.dtype), b, values, INDICES)

    return fast, ref, [(2, ROWS, D_IN), (D_OUT,), (INDICES.numel(),)], (2, ROWS, D_OUT)


CASES = {"lora": _lora, "adapter": lambda: _adapter(False), "adapter-residual": lambda: _adapter(True),
         "sparse-delta": _sparse_delta}


def _contents(shapes, out_shape):
    """float64 inputs and upstream gradient that bf16 holds exactly: autocast's casts of them lose nothing, so the
    float64 reference on them is the exact result of the autocast computation."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) / s[-1] ** 0.5 for s in shapes]
    return [t.to(BF16).double() for t in tensors], torch.randn(out_shape, generator=g).to(BF16).double()


def _run(fn, tensors, dtype, dy, autocast=False):
    leaves = [t.to(dtype, copy=True).requires_grad_() for t in tensors]
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("case", CASES)
def test_autocast_matches_reference_within_bf16_budget(case, backend, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    fast, ref, shapes, out_shape = CASES[case]()
    tensors, dy = _contents(shapes, out_shape)
    y, grads = _run(fast, tensors, torch.float32, dy, autocast=True)
    exact, exact_grads = _run(ref, tensors, torch.float64, dy)
    plain, plain_grads = _run(ref, tensors, BF16, dy)
    scale, scale_grads = _run(ref, [t.abs() for t in tensors], torch.float64, dy.abs())
    assert_close_to_reference("y", y, exact, plain, BF16, scale)
    for i, grad in enumerate(grads):
        assert grad.dtype == torch.float32, f"input {i}: gradient in {grad.dtype}, its leaf is float32"
        assert_close_to_reference(f"grad {i}", grad.to(BF16), exact_grads[i], plain_grads[i], BF16, scale_grads[i])


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("case", CASES)
def test_autocast_saves_what_bf16_inputs_save(case, backend, monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    fast, _, shapes, _ = CASES[case]()
    tensors, _ = _contents(shapes, (1,))

    def forward(dtype, autocast):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in tensors]
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            return fast(*leaves)

    under_autocast = saved_bytes(lambda: forward(torch.float32, True), ())[1]
    assert under_autocast == saved_bytes(lambda: forward(BF16, False), ())[1]
