"""Operand layouts the Triton kernels must not get wrong (interpreter on CPU; the same launchers run on GPU):
strided 1-D biases, index and value vectors, and views whose offsets pass 2**31 elements (rows of a decode
batch sliced from a long sequence; a column-major view), which the kernels must neither wrap nor read outside."""
import pytest
import torch

from fastpeft.kernels.layout import INT32_LIMIT, int32_columns, unit_stride
from fastpeft.ops.adapter import bottleneck_adapter
from fastpeft.ops.lora import lora_linear
from fastpeft.ops.sparse_delta import scatter_delta_, sddmm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_layout_helpers_copy_only_what_the_kernels_cannot_address():
    x = torch.randn(4, 6)
    assert int32_columns(x) is x
    assert int32_columns(x.t()).data_ptr() == x.data_ptr()  # column stride 6: addressable, no copy
    buffer = torch.empty(INT32_LIMIT + 64, dtype=torch.uint8)  # virtual: never touched but for 6 bytes
    far = buffer.as_strided((3, 2), (1, INT32_LIMIT // 2))  # column offsets reach 2**31 within a block
    assert int32_columns(far).stride() == (2, 1) and torch.equal(int32_columns(far), far)
    v = torch.arange(10.0)[::2]
    assert unit_stride(v).stride() == (1,) and torch.equal(unit_stride(v), v) and unit_stride(None) is None


def test_strided_biases():
    torch.manual_seed(0)
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    bias = torch.arange(10.0)[::2]
    torch.testing.assert_close(lora_linear(x, w, bias, a, b, 0.5, backend="triton"),
                               lora_linear(x, w, bias, a, b, 0.5, backend="reference"))
    h, wd, wu = torch.randn(3, 8), torch.randn(4, 8), torch.randn(8, 4)
    bd, bu = torch.arange(8.0)[::2], torch.arange(16.0)[::2]
    torch.testing.assert_close(bottleneck_adapter(h, wd, bd, wu, bu, backend="triton"),
                               bottleneck_adapter(h, wd, bd, wu, bu, backend="reference"))


def test_strided_index_and_value_vectors():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4), torch.randn(5, 6)
    indices = torch.arange(24, dtype=torch.int32)[::2]
    torch.testing.assert_close(sddmm(a, b, indices, backend="triton"), sddmm(a, b, indices, backend="reference"))
    weights = [torch.zeros(4, 6) for _ in range(2)]
    values, base = torch.arange(24.0)[::2], torch.zeros(24)[::2]
    for weight, backend in zip(weights, ("triton", "reference")):
        scatter_delta_(weight, base, values, indices, backend=backend)
    assert torch.equal(weights[0], weights[1])


def _view_past_int32(rows: int, cols: int, column_major: bool) -> torch.Tensor:
    """An fp32 [rows, cols] view whose largest offset passes 2**31: only its own pages of the (virtual, untouched)
    8 GiB buffer become resident."""
    stride = INT32_LIMIT // ((cols if column_major else rows) - 1) + 1
    span = stride * (cols if column_major else rows) + max(rows, cols)
    buffer = torch.empty(span)
    view = buffer.as_strided((rows, cols), (1, stride) if column_major else (stride, 1))
    view.copy_(torch.randn(rows, cols))
    return view


@pytest.mark.parametrize("rows, column_major", [(40, False), (70, True)])  # the decode kernel; the GEMM kernels
def test_offsets_past_int32(rows, column_major):
    torch.manual_seed(0)
    x = _view_past_int32(rows, 32, column_major)
    w, bias = torch.randn(16, 32), torch.randn(16)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    dy = torch.randn(rows, 16)
    results = {}
    for backend, source in (("triton", x), ("reference", x.contiguous())):
        out = lora_linear(source, w, bias, a, b, 2.0, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (a, b), dy))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
