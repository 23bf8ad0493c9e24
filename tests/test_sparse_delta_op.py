"""Every sparse-delta backend against the float64 reference: the merged forward, dx, d values, d bias, d weight,
the SDDMM alone and the scatter (bit-exact); the extension's many-block path; torch.compile; input validation."""
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import examples
from fastpeft.ops import sparse_delta as ops
from fastpeft.ops.sparse_delta import check_indices, index_dtype, scatter_delta_, sddmm, sparse_delta_linear
from layouts import with_layout
from sparse_delta_cases import (DTYPES, INDEX_DTYPES, LAYOUTS, check_backend, check_sddmm, densities, random_mask,
                                sparse_delta_cases)

CPU_BACKENDS = ["reference", "torch", "ext"]


def torch_gather_everywhere():
    """The torch backend's chunked gather-dot at every density (it is chosen only below 1%), in small chunks."""
    return mock.patch.multiple(ops, GATHER_MAX_DENSITY=2.0, GATHER_CHUNK=64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@examples(40)
@given(case=sparse_delta_cases())
def test_cpu_backends_match_reference(backend, case):
    check_backend(backend, case)


@examples(20)
@given(case=sparse_delta_cases())
def test_torch_gather_dot_matches_reference(case):
    with torch_gather_everywhere():
        check_backend("torch", case)


@examples(20)
@given(case=sparse_delta_cases(max_m=24, max_kn=24))
def test_triton_interpreted_matches_reference(case):
    check_backend("triton", case)


@st.composite
def sddmm_inputs(draw, max_m=90, max_rc=70):
    m, rows, cols = draw(st.integers(1, max_m)), draw(st.integers(1, max_rc)), draw(st.integers(1, max_rc))
    dtype, seed = draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31 - 2))
    g = torch.Generator().manual_seed(seed)
    a = with_layout(torch.randn(m, rows, generator=g), draw(st.sampled_from(LAYOUTS)), dtype)
    b = with_layout(torch.randn(m, cols, generator=g), draw(st.sampled_from(LAYOUTS)), dtype)
    indices = random_mask(rows * cols, draw(densities), draw(st.sampled_from(INDEX_DTYPES)), seed)
    return a, b, indices


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@examples(30)
@given(inputs=sddmm_inputs())
def test_sddmm_matches_reference(backend, inputs):
    check_sddmm(backend, *inputs)


@examples(15)
@given(inputs=sddmm_inputs())
def test_sddmm_torch_gather_dot_matches_reference(inputs):
    with torch_gather_everywhere():
        check_sddmm("torch", *inputs)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed", "row-padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ext_sddmm_over_many_row_blocks_and_threads(layout, dtype):
    """M = 301 rows: nine full 32-row blocks and a partial one, split over threads (the per-thread partial sums are
    added at the end); 400 nonzeros of a 100 x 120 mask use most columns of both operands."""
    g = torch.Generator().manual_seed(1)

    def operand(cols):
        if layout == "row-padded":  # unit column stride, row stride > cols
            return torch.randn(301, cols + 5, generator=g).to(dtype)[:, 2:cols + 2]
        return with_layout(torch.randn(301, cols, generator=g), layout, dtype)

    for index in INDEX_DTYPES:
        check_sddmm("ext", operand(100), operand(120), random_mask(100 * 120, 1 / 30, index, seed=2))


def test_ext_sddmm_in_several_passes():
    """288,000 nonzeros (density 0.24, below the dense switch): more than one pass of per-thread accumulators."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(33, 1000, generator=g), torch.randn(33, 1200, generator=g)
    check_sddmm("ext", a, b, random_mask(1000 * 1200, 0.24, torch.int32, seed=10))


def scattered_one_by_one(weight, base_values, values, indices):
    """The scatter's contract written out entry by entry, apart from scatter_delta_ref's row / column index_put:
    the flat position's entry becomes the fp32 sum rounded once to the weight's dtype."""
    out = weight.clone()
    flat = out.view(-1)
    for j, position in enumerate(indices.tolist()):
        flat[position] = (base_values[j].float() + values[j].float()).to(out.dtype)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_is_bit_exact_and_ignores_what_the_weight_held(backend, dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 45, generator=g).to(dtype)
    indices = random_mask(base.numel(), 0.3, index_dtype(base.numel()), seed=4)
    base_values = base.view(-1)[indices.long()].clone()
    values = torch.randn(indices.numel(), generator=g) * 1e-2
    want = scattered_one_by_one(base, base_values, values, indices)
    stale = base.clone()
    stale.view(-1)[indices.long()] = 7.0  # a previous merge: the result depends only on base_values + values
    version = stale._version
    assert scatter_delta_(stale, base_values, values, indices, backend=backend) is stale
    assert stale._version > version  # autograd sees the write (a graph that saved the weight then refuses it)
    assert torch.equal(stale.view(torch.uint8), want.view(torch.uint8))
    transposed = base.t().contiguous().t()  # row-major positions of a column-major weight
    scatter_delta_(transposed, base_values, values, indices, backend=backend)
    assert torch.equal(transposed, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton"])
def test_empty_batch_and_empty_mask(backend):
    weight = torch.randn(5, 4)
    x = torch.zeros(0, 4, requires_grad=True)
    values = torch.zeros(3, requires_grad=True)
    y = sparse_delta_linear(x, weight, None, values, torch.tensor([1, 6, 19], dtype=torch.int32), backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 4) and torch.equal(values.grad, torch.zeros(3))
    none = torch.zeros(0, dtype=torch.int64)
    assert sddmm(torch.randn(6, 5), torch.randn(6, 4), none, backend=backend).shape == (0,)
    assert torch.equal(scatter_delta_(weight.clone(), torch.zeros(0), torch.zeros(0), none, backend=backend), weight)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_compiled_matches_eager(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 24, generator=g, requires_grad=True)
    weight, bias = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    indices = random_mask(weight.numel(), 0.05, torch.int32, seed=6)
    values = torch.randn(indices.numel(), generator=g, requires_grad=True)

    def step(fn):
        y = fn(x, weight, bias, values, indices, False, backend)
        return (y, *torch.autograd.grad(y.square().sum(), (x, values)))

    compiled = torch.compile(sparse_delta_linear, backend="aot_eager", fullgraph=True)
    got_all, want_all = step(compiled), step(sparse_delta_linear)
    assert all(g.count_nonzero() > 0 for g in want_all[1:])
    for got, want in zip(got_all, want_all):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------- errors
def linear_args(**override):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(5, 4), bias=torch.randn(5), values=torch.randn(2),
                indices=torch.tensor([1, 7], dtype=torch.int32))
    args.update(override)
    return args


@pytest.mark.parametrize("override, error, message", [
    (dict(x=torch.randn(3, 6)), ValueError, r"x's last dimension must equal the weight's in_features 4"),
    (dict(x=torch.randn(3, 4, dtype=torch.float64)), TypeError, "weight has dtype torch.float32 but x has torch.float64"),
    (dict(weight=torch.randn(5, 4, 1)), ValueError, r"weight must be 2-D, got shape \(5, 4, 1\)"),
    (dict(x=torch.randn(3, 4).bfloat16()), TypeError, "weight has dtype torch.float32 but x has torch.bfloat16"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\), got \(4,\)"),
    (dict(values=torch.randn(3)), ValueError, r"indices and values must have one length, got shapes \(2,\) and \(3,\)"),
    (dict(values=torch.randn(2, 1)), ValueError, r"values must be 1-D"),
    (dict(indices=torch.tensor([1.0, 7.0])), TypeError, "indices must be int32 or int64, got torch.float32"),
    (dict(indices=[1, 7]), TypeError, "indices must be a torch.Tensor, got list"),
    (dict(indices=torch.tensor([[1, 7]])), ValueError, r"indices must be 1-D, got shape \(1, 2\)"),
    (dict(indices=torch.tensor([1, 7], device="meta")), ValueError, "indices is on meta but weight is on cpu"),
    (dict(values=torch.randn(2, device="meta")), ValueError, "values is on meta but weight is on cpu"),
])
def test_bad_linear_input_is_named(override, error, message):
    with pytest.raises(error, match=message):
        sparse_delta_linear(**linear_args(**override))


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(3, 4), torch.randn(2, 5)), ValueError, r"a and b must have the same number of rows"),
    ((torch.randn(3, 4), torch.randn(3, 5).half()), TypeError, "b has dtype torch.float16 but a has torch.float32"),
    ((torch.randn(3), torch.randn(3, 5)), ValueError, r"a must be 2-D"),
    ((torch.randn(3, 4), torch.randn(3, 5).long()), TypeError, "b must be float32, bfloat16, float16 or float64"),
])
def test_bad_sddmm_input_is_named(args, error, message):
    with pytest.raises(error, match=message):
        sddmm(*args, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.int16"):
        sddmm(torch.randn(3, 4), torch.randn(3, 5), torch.tensor([0, 3], dtype=torch.int16))


def test_bad_scatter_input_is_named():
    weight, values, indices = torch.randn(4, 5), torch.randn(2), torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"base_values must have shape \(2,\), got \(3,\)"):
        scatter_delta_(weight, torch.randn(3), values, indices)
    with pytest.raises(TypeError, match="base_values has dtype torch.bfloat16 but weight has torch.float32"):
        scatter_delta_(weight, torch.randn(2).bfloat16(), values, indices)


@pytest.mark.parametrize("indices, message", [
    (torch.tensor([0, 20]), r"indices must lie in \[0, 20\) \(the weight's flat positions\), got \[0, 20\]"),
    (torch.tensor([-1, 3]), r"indices must lie in \[0, 20\)"),
    (torch.tensor([3, 3]), "indices must be strictly increasing"),
    (torch.tensor([5, 3]), "indices must be strictly increasing"),
])
def test_check_indices_names_the_problem(indices, message):
    with pytest.raises(ValueError, match=message):
        check_indices(indices, 20)
    check_indices(indices.sort().values.unique().clamp(0, 19), 20)  # the repaired mask passes


@pytest.mark.parametrize("indices", [torch.tensor([0, 20]), torch.tensor([3, 3]), torch.tensor([5, 3])])
def test_extension_refuses_indices_it_would_read_or_write_out_of_place(indices):
    """The per-step entry points leave the data check to check_indices; the extension's kernels still check it,
    as a C++ error, rather than touch memory outside the tensors."""
    with pytest.raises(RuntimeError, match=r"indices must be strictly increasing flat positions in \[0, 20\)"):
        sddmm(torch.randn(3, 4), torch.randn(3, 5), indices, backend="ext")
    with pytest.raises(RuntimeError, match=r"indices must be strictly increasing flat positions in \[0, 20\)"):
        scatter_delta_(torch.randn(4, 5), torch.randn(2), torch.randn(2), indices, backend="ext")


def test_index_dtype_is_int32_where_it_fits():
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize("backend", ["triton", "torch"])
    @examples(40)
    @given(case=sparse_delta_cases(max_m=300, max_kn=300))
    def test_backends_match_reference(self, backend, case):
        check_backend(backend, case, device="cuda")

    @examples(40)
    @given(inputs=sddmm_inputs(max_m=700, max_rc=300))
    def test_sddmm_matches_reference(self, inputs):
        check_sddmm("triton", *(t.cuda() for t in inputs))

    def test_many_nonzeros_and_rows(self):
        g = torch.Generator().manual_seed(7)
        a = torch.randn(4099, 257, generator=g).cuda().bfloat16()
        b = torch.randn(4099, 513, generator=g).cuda().bfloat16()
        check_sddmm("triton", a, b, random_mask(257 * 513, 0.01, torch.int32, seed=8, device="cuda"))

