"""Hypothesis strategy and runner for sparse-delta op property tests, shared by the CPU and GPU suites.

The fast path trains on a weight that holds W0 + delta (scattered by `scatter_delta_`), the oracle computes from
W0 itself in float64 (`sparse_delta_linear_ref`), and "PyTorch in the dtype" is F.linear on the merged weight in
the input dtype, whose dW gathered at the mask is its values' gradient.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from fastpeft.ops.sparse_delta import (scatter_delta_, scatter_delta_ref, sddmm, sddmm_ref, sparse_delta_linear,
                                       sparse_delta_linear_ref)
from layouts import with_layout
from numerics import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
LAYOUTS = ["contiguous", "strided", "transposed"]  # of x and dy (tests/layouts.py)
# Densities: none, all, the sparse range where the kernels run their sparse paths (the extension goes dense from
# 0.25), and anything.
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 0.2), st.floats(0.0, 1.0))


@dataclass
class SparseDeltaCase:
    lead: tuple  # leading batch dims before the row dim
    m: int
    k: int  # in_features
    n: int  # out_features
    density: float
    dtype: torch.dtype
    values_dtype: torch.dtype  # float32 (how SparseDeltaLinear keeps them) or the input dtype
    index_dtype: torch.dtype
    fan_in_fan_out: bool  # stored weight [in, out] (GPT-2 Conv1D)
    bias: bool
    weight_trainable: bool  # weight and bias require grad too
    x_layout: str
    dy_layout: str
    seed: int

    @property
    def stored_shape(self) -> tuple:
        return (self.k, self.n) if self.fan_in_fan_out else (self.n, self.k)


@st.composite
def sparse_delta_cases(draw, max_m=40, max_kn=40, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    return SparseDeltaCase(
        lead=draw(st.sampled_from([(), (), (1,), (2,), (2, 3)])),
        m=draw(st.integers(1, max_m)),
        k=draw(st.integers(1, max_kn)),
        n=draw(st.integers(1, max_kn)),
        density=draw(densities),
        dtype=dtype,
        values_dtype=draw(st.sampled_from([torch.float32, dtype])),
        index_dtype=draw(st.sampled_from(INDEX_DTYPES)),
        fan_in_fan_out=draw(st.booleans()),
        bias=draw(st.booleans()),
        weight_trainable=draw(st.sampled_from([False, False, True])),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        dy_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 2)),
    )


def random_mask(numel: int, density: float, index_dtype=torch.int64, seed: int = 0, device="cpu") -> torch.Tensor:
    """round(density * numel) distinct flat positions, sorted: a duplicate-free random mask."""
    g = torch.Generator().manual_seed(seed)
    nnz = round(density * numel)
    return torch.randperm(numel, generator=g)[:nnz].sort().values.to(device=device, dtype=index_dtype)


def make_inputs(case: SparseDeltaCase, device="cpu"):
    """x, W0 (stored layout), bias, values, upstream dy: the input dtype's numbers, held in float64; the mask."""
    g = torch.Generator().manual_seed(case.seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    rows, cols = case.stored_shape
    indices = random_mask(rows * cols, case.density, case.index_dtype, case.seed, device)
    x = rand(*case.lead, case.m, case.k).to(case.dtype).double()
    weight0 = (rand(rows, cols) / case.k**0.5).to(case.dtype).double()
    bias = rand(case.n).to(case.dtype).double() if case.bias else None
    values = (rand(indices.numel()) / 4).to(case.values_dtype).double()
    dy = rand(*case.lead, case.m, case.n).to(case.dtype).double()
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (x, weight0, bias, values)], move(dy), indices


def _merged(weight0, values, indices, dtype):
    """W0 + delta at the mask, summed in fp32 and rounded once to `dtype`, by the reference."""
    merged = weight0.to(dtype)
    return scatter_delta_ref(merged, merged.view(-1)[indices.long()].clone(), values, indices)


def _run(case, forward, leaves, dy):
    y = forward(*leaves)
    y.backward(with_layout(dy, case.dy_layout, y.dtype))
    return y.detach(), [None if t is None or not t.requires_grad else t.grad for t in leaves]


def check_backend(backend: str, case: SparseDeltaCase, device="cpu") -> None:
    """Forward with the delta merged, dx, d values, d bias and d weight of `backend` against float64 with the
    2x-PyTorch-error budget; the merge itself (scatter_delta_) bit-exact against the reference."""
    (x, weight0, bias, values), dy, indices = make_inputs(case, device)
    trainable = case.weight_trainable

    def exact(x, weight0, bias, values, dy):
        leaves = [x.clone().requires_grad_(), weight0.clone().requires_grad_(trainable),
                  None if bias is None else bias.clone().requires_grad_(trainable), values.clone().requires_grad_()]
        forward = lambda x, w, b, v: sparse_delta_linear_ref(x, w, b, v, indices, case.fan_in_fan_out)  # noqa: E731
        return _run(case, forward, leaves, dy)

    want = exact(x, weight0, bias, values, dy)
    scale = exact(x.abs(), weight0.abs(), None if bias is None else bias.abs(), values.abs(), dy.abs())

    # PyTorch in the dtype: F.linear on the merged weight, d values = its dW at the mask.
    merged = _merged(weight0, values.to(case.values_dtype), indices, case.dtype).requires_grad_()
    leaves = [with_layout(x, case.x_layout, case.dtype).requires_grad_(), merged,
              None if bias is None else bias.to(case.dtype).requires_grad_(trainable)]
    plain_y, (plain_dx, plain_dw, plain_db) = _run(
        case, lambda x, w, b: F.linear(x, w.t() if case.fan_in_fan_out else w, b), leaves, dy)
    plain_dvalues = plain_dw.view(-1)[indices.long()].to(case.values_dtype)

    weight = weight0.to(case.dtype)
    base_values = weight.view(-1)[indices.long()].clone()
    values_fast = values.to(case.values_dtype)
    scatter_delta_(weight, base_values, values_fast, indices, backend=backend)
    assert torch.equal(weight, merged.detach()), "scatter_delta_ differs from the reference merge"
    leaves = [with_layout(x, case.x_layout, case.dtype).requires_grad_(), weight.requires_grad_(trainable),
              None if bias is None else bias.to(case.dtype).requires_grad_(trainable),
              values_fast.clone().requires_grad_()]
    forward = lambda x, w, b, v: sparse_delta_linear(x, w, b, v, indices, case.fan_in_fan_out, backend)  # noqa: E731
    got_y, (got_dx, got_dw, got_db, got_dvalues) = _run(case, forward, leaves, dy)

    want_y, (want_dx, want_dw, want_db, want_dvalues) = want
    scale_y, (scale_dx, scale_dw, scale_db, scale_dvalues) = scale
    assert_close_to_reference("y", got_y, want_y, plain_y, case.dtype, scale_y)
    assert_close_to_reference("dx", got_dx, want_dx, plain_dx, case.dtype, scale_dx)
    assert_close_to_reference("dvalues", got_dvalues, want_dvalues, plain_dvalues, case.values_dtype, scale_dvalues)
    if trainable:
        assert_close_to_reference("dweight", got_dw, want_dw, plain_dw, case.dtype, scale_dw)
        if bias is not None:
            assert_close_to_reference("dbias", got_db, want_db, plain_db, case.dtype, scale_db)
    else:
        assert got_dw is None and got_db is None, "gradient given for a frozen weight / bias"


def check_sddmm(backend: str, a, b, indices) -> None:
    """`sddmm` of `backend` against float64, with the budget of PyTorch's (a^T b)[mask] in the input dtype."""
    got = sddmm(a, b, indices, backend=backend)
    want = sddmm_ref(a.double(), b.double(), indices)
    scale = sddmm_ref(a.double().abs(), b.double().abs(), indices)
    plain = (a.t() @ b).flatten()[indices.long()].float()
    assert_close_to_reference("sddmm", got, want, plain, torch.float32, scale)
