"""The fused low-rank CPU ops (csrc/lora_lowrank.cpp) against float64 torch math with the shared dropout mask.

Each op accumulates in fp32 whatever the input dtype, so its error against float64 is that of an fp32 sum of the
same terms: at most a few fp32 ulps of the sum of absolute values (`scale`), plus one rounding of dx to its dtype.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from budget import examples
from fastpeft.ops.dropout import keep_mask
from test_ext_dropout import DTYPES, ext, make_2d  # noqa: F401  (ext is a fixture)

LAYOUTS = ["contiguous", "transposed", "column-strided", "row-padded"]
FP32_SUM_RTOL = 1e-5  # an fp32 sum of up to ~100 terms: well within 2**-23 * terms
ROUND_TO = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative

seeds = st.integers(-(2**63), 2**63 - 1)
rows = st.integers(1, 70)
cols = st.integers(1, 90)
ranks = st.integers(1, 64)
probabilities = st.sampled_from([0.0, 0.1, 0.5])


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """float64 dropout of x with the reference mask (p == 0: x itself)."""
    if p == 0.0:
        return x.double()
    return x.double() * keep_mask(seed, *x.shape, p).double() / (1.0 - p)


def assert_fp32_sum(actual: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, extra_rel=0.0):
    """|actual - exact| <= rtol * scale elementwise (scale: the same sum over absolute values)."""
    assert actual.dtype == torch.float32 and actual.shape == exact.shape
    budget = FP32_SUM_RTOL * scale + extra_rel * exact.abs() + 1e-30
    err = (actual.double() - exact).abs()
    assert (err <= budget).all(), f"max error {err.max().item():.3g}, worst ratio {(err / budget).max().item():.3g}"


@examples(60)
@given(seed=seeds, m=rows, k=cols, n=cols, r=ranks, p=probabilities, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), with_bias=st.booleans(), scaling=st.floats(0.25, 4.0),
       data_seed=st.integers(0, 2**31))
def test_lowrank_out_is_bias_plus_scaled_lowrank_term_and_gives_the_shrink(ext, seed, m, k, n, r, p, dtype, layout,
                                                                           with_bias, scaling, data_seed):
    x = make_2d(m, k, dtype, layout, data_seed)
    a, b = make_2d(r, k, dtype, "contiguous", data_seed + 1), make_2d(n, r, dtype, "contiguous", data_seed + 2)
    bias = make_2d(1, n, dtype, "contiguous", data_seed + 3)[0] if with_bias else None
    out, s = ext.lora_lowrank_out(x, a, b, bias, scaling, torch.tensor(seed), p)
    assert s.is_contiguous() and s.dtype == torch.float32 and out.is_contiguous() and out.dtype == dtype
    xd = dropped(x, p, seed)
    assert_fp32_sum(s, xd @ a.double().t(), xd.abs() @ a.double().abs().t())
    lowrank = scaling * (xd @ a.double().t()) @ b.double().t()
    exact = lowrank + (0.0 if bias is None else bias.double())
    scale = scaling * (xd.abs() @ a.double().abs().t()) @ b.double().abs().t() + exact.abs()
    err = (out.double() - exact).abs()
    assert (err <= 2 * FP32_SUM_RTOL * scale + ROUND_TO[dtype] * exact.abs() + 1e-30).all(), err.max()


@examples(60)
@given(m=rows, n=cols, r=ranks, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       scaling=st.floats(0.25, 4.0), data_seed=st.integers(0, 2**31))
def test_dy_pass_gives_g_and_db(ext, m, n, r, dtype, layout, scaling, data_seed):
    dy = make_2d(m, n, dtype, layout, data_seed)
    b = make_2d(n, r, dtype, "contiguous", data_seed + 1)
    s = make_2d(m, r, torch.float32, layout, data_seed + 2)
    g, db = ext.lora_dy_pass(dy, b, s, scaling)
    dy64, b64, s64 = dy.double(), b.double(), s.double()
    # scaling is applied to b (and s) in fp32 first: one more rounding per term
    assert_fp32_sum(g, scaling * dy64 @ b64, scaling * dy64.abs() @ b64.abs())
    assert_fp32_sum(db, scaling * dy64.t() @ s64, scaling * dy64.abs().t() @ s64.abs())


@examples(80)
@given(seed=seeds, m=rows, k=cols, r=ranks, p=probabilities, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), with_dx=st.booleans(), accumulate=st.booleans(),
       data_seed=st.integers(0, 2**31))
def test_dx_pass_gives_da_and_adds_masked_g_a_into_dx(ext, seed, m, k, r, p, dtype, layout, with_dx, accumulate,
                                                      data_seed):
    """accumulate=False writes the masked G A over dx, whose values are then never read; lora_da_pass is the same
    pass without dx."""
    x = make_2d(m, k, dtype, layout, data_seed)
    g = make_2d(m, r, torch.float32, "contiguous", data_seed + 1)
    a = make_2d(r, k, dtype, "contiguous", data_seed + 2)
    dx = make_2d(m, k, dtype, "contiguous", data_seed + 3) if with_dx else None
    dx_before = None if dx is None else (dx.clone() if accumulate else torch.zeros_like(dx))
    storage = None if dx is None else dx.data_ptr()
    if dx is not None and not accumulate:
        dx.fill_(float("nan"))

    if dx is None:
        da = ext.lora_da_pass(x, g, a, torch.tensor(seed), p)
    else:
        da = ext.lora_dx_pass_(x, g, a, dx, torch.tensor(seed), p, accumulate=accumulate)

    xd = dropped(x, p, seed)
    assert_fp32_sum(da, g.double().t() @ xd, g.double().abs().t() @ xd.abs())
    if dx is not None:
        assert dx.data_ptr() == storage and dx.dtype == dtype
        through_a = dropped(g.double() @ a.double(), p, seed)
        scale = dx_before.double().abs() + dropped(g.double().abs() @ a.double().abs(), p, seed)
        exact = dx_before.double() + through_a
        err = (dx.double() - exact).abs()
        budget = FP32_SUM_RTOL * scale + ROUND_TO[dtype] * exact.abs() + 1e-30
        assert (err <= budget).all(), f"dx: max error {err.max().item():.3g}"


@examples(60)
@given(m=rows, k=cols, n=cols, r=ranks, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       scaling=st.floats(0.25, 4.0), data_seed=st.integers(0, 2**31))
def test_grad_pass_gives_da_and_db_from_x_and_dy(ext, m, k, n, r, dtype, layout, scaling, data_seed):
    """Without dropout: dA = s (dy B)^T x and dB = s dy^T (x A^T), the shrink recomputed inside."""
    x, dy = make_2d(m, k, dtype, layout, data_seed), make_2d(m, n, dtype, layout, data_seed + 1)
    a, b = make_2d(r, k, dtype, "contiguous", data_seed + 2), make_2d(n, r, dtype, "contiguous", data_seed + 3)
    da, db = ext.lora_grad_pass(x, dy, a, b, scaling)
    x64, dy64, a64, b64 = x.double(), dy.double(), a.double(), b.double()
    assert_fp32_sum(da, scaling * (dy64 @ b64).t() @ x64, scaling * (dy64.abs() @ b64.abs()).t() @ x64.abs())
    assert_fp32_sum(db, scaling * dy64.t() @ (x64 @ a64.t()), scaling * dy64.abs().t() @ (x64.abs() @ a64.abs().t()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_shapes_cross_tiles_and_chunks(ext, dtype):
    """Wide rows (K, N > 1024) and row chunks on every thread: the partial sums must add up."""
    m, k, n, r, p, seed = 203, 2100, 1500, 24, 0.1, 77
    x, dy = make_2d(m, k, dtype, "contiguous", 1), make_2d(m, n, dtype, "row-padded", 2)
    a, b = make_2d(r, k, dtype, "contiguous", 3), make_2d(n, r, dtype, "contiguous", 4)
    _, s = ext.lora_lowrank_out(x, a, b, None, 2.0, torch.tensor(seed), p)
    xd = dropped(x, p, seed)
    assert_fp32_sum(s, xd @ a.double().t(), xd.abs() @ a.double().abs().t())
    g, db = ext.lora_dy_pass(dy, b, s, 2.0)
    assert_fp32_sum(g, 2.0 * dy.double() @ b.double(), 2.0 * dy.double().abs() @ b.double().abs())
    assert_fp32_sum(db, 2.0 * dy.double().t() @ s.double(), 2.0 * dy.double().abs().t() @ s.double().abs())
    da = ext.lora_da_pass(x, g, a, torch.tensor(seed), p)
    assert_fp32_sum(da, g.double().t() @ xd, g.double().abs().t() @ xd.abs())
    da, db = ext.lora_grad_pass(x, dy, a, b, 2.0)
    x64, dy64, a64, b64 = x.double(), dy.double(), a.double(), b.double()
    assert_fp32_sum(da, 2.0 * (dy64 @ b64).t() @ x64, 2.0 * (dy64.abs() @ b64.abs()).t() @ x64.abs())
    assert_fp32_sum(db, 2.0 * dy64.t() @ (x64 @ a64.t()), 2.0 * dy64.abs().t() @ (x64.abs() @ a64.abs().t()))


@pytest.mark.parametrize("width", [768, 771])  # whole expand blocks only, or a partial last block per row
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_large_outputs_have_the_bits_of_their_rows_computed_alone(ext, width, p):
    """Outputs of several MiB over both threads: every row has the bits it gets when computed alone (rows are
    computed independently; the mask keys on the row), and no row is left unwritten."""
    m, r, seed, head = 2900, 8, 5, 64  # fp32 x and output 8.9 MB each
    x, a = make_2d(m, width, torch.float32, "contiguous", 1), make_2d(r, width, torch.float32, "contiguous", 2)
    b, bias = make_2d(width, r, torch.float32, "contiguous", 3), make_2d(1, width, torch.float32, "contiguous", 4)[0]
    g = make_2d(m, r, torch.float32, "contiguous", 5)
    out, _ = ext.lora_lowrank_out(x, a, b, bias, 2.0, torch.tensor(seed), p)
    out_head, _ = ext.lora_lowrank_out(x[:head], a, b, bias, 2.0, torch.tensor(seed), p)
    assert torch.equal(out[:head], out_head)
    dx, dx_head = torch.full_like(x, float("nan")), torch.empty(head, width)
    ext.lora_dx_pass_(x, g, a, dx, torch.tensor(seed), p, accumulate=False)
    ext.lora_dx_pass_(x[:head], g[:head], a, dx_head, torch.tensor(seed), p, accumulate=False)
    assert torch.equal(dx[:head], dx_head)
    assert not dx.isnan().any()
    torch.testing.assert_close(dx, dropped(g.double() @ a.double(), p, seed).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_are_deterministic_for_a_thread_count(ext, threads):
    m, k, n, r, p, seed = 517, 300, 200, 16, 0.1, 5
    x, dy = make_2d(m, k, torch.float32, "contiguous", 1), make_2d(m, n, torch.float32, "contiguous", 2)
    a, b = make_2d(r, k, torch.float32, "contiguous", 3), make_2d(n, r, torch.float32, "contiguous", 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for _ in range(2):
            out, s = ext.lora_lowrank_out(x, a, b, None, 0.5, torch.tensor(seed), p)
            g, db = ext.lora_dy_pass(dy, b, s, 0.5)
            dx = torch.zeros(m, k)
            da = ext.lora_dx_pass_(x, g, a, dx, torch.tensor(seed), p)
            runs.append((out, s, g, db, da, dx) + tuple(ext.lora_grad_pass(x, dy, a, b, 0.5)))
    finally:
        torch.set_num_threads(before)
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    xd = dropped(x, p, seed)
    assert_fp32_sum(runs[0][4], runs[0][2].double().t() @ xd, runs[0][2].double().abs().t() @ xd.abs())


def test_empty_and_meta_inputs(ext):
    out, s = ext.lora_lowrank_out(torch.empty(0, 5), torch.randn(3, 5), torch.randn(2, 3), None, 1.0, torch.tensor(1), 0.5)
    assert out.shape == (0, 2) and s.shape == (0, 3)
    out, s = ext.lora_lowrank_out(torch.empty(4, 0), torch.empty(3, 0), torch.randn(2, 3), torch.ones(2), 1.0, torch.tensor(1), 0.5)
    assert torch.equal(s, torch.zeros(4, 3)) and torch.equal(out, torch.ones(4, 2))
    g, db = ext.lora_dy_pass(torch.empty(0, 6), torch.randn(6, 2), torch.empty(0, 2), 1.0)
    assert g.shape == (0, 2) and torch.equal(db, torch.zeros(6, 2))
    assert torch.equal(ext.lora_da_pass(torch.empty(0, 5), torch.empty(0, 2), torch.randn(2, 5), torch.tensor(1), 0.1),
                       torch.zeros(2, 5))
    x = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    out, s = ext.lora_lowrank_out(x, torch.empty(3, 7, device="meta", dtype=torch.bfloat16),
                                  torch.empty(4, 3, device="meta", dtype=torch.bfloat16), None, 2.0, torch.tensor(3), 0.1)
    assert s.shape == (5, 3) and s.dtype == torch.float32 and s.device.type == "meta"
    assert out.shape == (5, 4) and out.dtype == torch.bfloat16
    g, db = ext.lora_dy_pass(x, torch.empty(7, 3, device="meta"), s, 2.0)
    assert g.shape == (5, 3) and db.shape == (7, 3) and db.dtype == torch.float32
    da = ext.lora_dx_pass_(x, g, torch.empty(3, 7, device="meta"), torch.empty_like(x), torch.tensor(3), 0.1)
    assert da.shape == (3, 7) and da.dtype == torch.float32 and da.device.type == "meta"
    da, db = ext.lora_grad_pass(x, x[:, :4], torch.empty(3, 7, device="meta"), torch.empty(4, 3, device="meta"), 2.0)
    assert da.shape == (3, 7) and db.shape == (4, 3) and db.dtype == torch.float32 and db.device.type == "meta"
    da, db = ext.lora_grad_pass(torch.empty(0, 5), torch.empty(0, 6), torch.randn(2, 5), torch.randn(6, 2), 1.0)
    assert torch.equal(da, torch.zeros(2, 5)) and torch.equal(db, torch.zeros(6, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_ops_pass_torch_library_opcheck(ext, dtype, p):
    """Schemas, fake kernels and the in-place optional dx hold up under torch.compile's tracing."""
    x, dy = make_2d(6, 5, dtype, "contiguous", 1), make_2d(6, 4, dtype, "transposed", 2)
    a, b = make_2d(3, 5, dtype, "contiguous", 3), make_2d(4, 3, dtype, "contiguous", 4)
    s, g = make_2d(6, 3, torch.float32, "contiguous", 5), make_2d(6, 3, torch.float32, "contiguous", 6)
    seed = torch.tensor(3)
    torch.library.opcheck(torch.ops.fastpeft.lora_lowrank_out.default, (x, a, b, None, 2.0, seed, p))
    torch.library.opcheck(torch.ops.fastpeft.lora_lowrank_out.default, (x, a, b, make_2d(1, 4, dtype, "contiguous", 7)[0], 2.0, seed, p))
    torch.library.opcheck(torch.ops.fastpeft.lora_dy_pass.default, (dy, b, s, 2.0))
    torch.library.opcheck(torch.ops.fastpeft.lora_dx_pass_.default, (x, g, a, torch.zeros(6, 5, dtype=dtype), seed, p))
    torch.library.opcheck(torch.ops.fastpeft.lora_da_pass.default, (x, g, a, seed, p))
    torch.library.opcheck(torch.ops.fastpeft.lora_dx_pass_.default, (x, g, a, torch.zeros(6, 5, dtype=dtype), seed, p, False))
    torch.library.opcheck(torch.ops.fastpeft.lora_grad_pass.default, (x, dy, a, b, 2.0))


SEED = torch.tensor(0)  # the ops' seed: a one-element int64 tensor


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.lora_lowrank_out(_t(2, 3, 4), _t(2, 4), _t(5, 2), None, 1.0, SEED, 0.1), "lora_lowrank_out: x must be 2-D"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 4), _t(5, 2), None, 1.0, SEED, 0.1), "a of shape .* must have K"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 3), _t(5, 3), None, 1.0, SEED, 0.1), "b of shape .* must have r"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 3), _t(5, 2), _t(4), 1.0, SEED, 0.1), "bias must have shape"),
    (lambda e: e.lora_lowrank_out(_t(2, 3, dtype=torch.float64), _t(2, 3), _t(5, 2), None, 1.0, SEED, 0.1),
     "x dtype must be float32"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 3, dtype=torch.int32), _t(5, 2), None, 1.0, SEED, 0.1),
     "a dtype must be float32"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 3), _t(5, 2), None, 1.0, SEED, 1.0), "p must satisfy 0 <= p < 1"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), torch.empty(2, 3, device="meta"), _t(5, 2), None, 1.0, SEED, 0.1),
     "a device"),
    (lambda e: e.lora_dy_pass(_t(4, 3), _t(2, 2), _t(4, 2), 1.0), "b of shape .* must have N"),
    (lambda e: e.lora_dy_pass(_t(4, 3), _t(3, 2), _t(5, 2), 1.0), "s of shape .* must have M"),
    (lambda e: e.lora_dy_pass(_t(4, 3), _t(3, 2), _t(4, 3), 1.0), "s of shape .* must have r"),
    (lambda e: e.lora_dy_pass(_t(4, 3), _t(3, 2), _t(4, 2, dtype=torch.bfloat16), 1.0), "s dtype must be float32"),
    (lambda e: e.lora_dy_pass(_t(4), _t(3, 2), _t(4, 2), 1.0), "dy must be 2-D"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(4, 2), _t(2, 5), SEED, 0.1), "a of shape .* must have K"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(5, 2), _t(2, 3), SEED, 0.1), "g of shape .* must have M"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(4, 2), _t(3, 3), SEED, 0.1), "a of shape .* must have r"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(4, 2, dtype=torch.bfloat16), _t(2, 3), SEED, 0.1), "g dtype"),
    (lambda e: e.lora_dx_pass_(_t(4, 3), _t(4, 2), _t(2, 3), _t(4, 4), SEED, 0.1), "dx shape"),
    (lambda e: e.lora_dx_pass_(_t(4, 3), _t(4, 2), _t(2, 3), _t(4, 3, dtype=torch.bfloat16), SEED, 0.1), "dx dtype"),
    (lambda e: e.lora_dx_pass_(_t(4, 3), _t(4, 2), _t(2, 3), _t(3, 4).t(), SEED, 0.1), "dx must be contiguous"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(4, 2), _t(2, 3), SEED, -0.5), "p must satisfy 0 <= p < 1"),
    (lambda e: e.lora_da_pass(_t(4, 3), _t(4, 2), _t(2, 3), torch.tensor([0, 1]), 0.1),
     "lora_da_pass: seed must be a one-element int64 cpu tensor"),
    (lambda e: e.lora_lowrank_out(_t(2, 3), _t(2, 3), _t(5, 2), None, 1.0, torch.tensor(0.0), 0.1),
     "lora_lowrank_out: seed must be a one-element int64 cpu tensor"),
    (lambda e: e.dropout_forward(_t(2, 3), torch.empty((), dtype=torch.int64, device="meta"), 0.1),
     "dropout_forward: seed must be a one-element int64 cpu tensor"),
    (lambda e: e.lora_grad_pass(_t(4, 3), _t(5, 2), _t(2, 3), _t(2, 2), 1.0), "dy of shape .* must have M"),
    (lambda e: e.lora_grad_pass(_t(4, 3), _t(4, 2), _t(2, 5), _t(2, 2), 1.0), "a of shape .* must have K"),
    (lambda e: e.lora_grad_pass(_t(4, 3), _t(4, 2), _t(2, 3), _t(3, 2), 1.0), "b of shape .* must have N"),
    (lambda e: e.lora_grad_pass(_t(4, 3), _t(4, 2), _t(2, 3), _t(2, 3), 1.0), "b of shape .* must have r"),
    (lambda e: e.lora_grad_pass(_t(4, 3), _t(4, 2, dtype=torch.bfloat16), _t(2, 3), _t(2, 2), 1.0), "dy dtype"),
])
def test_bad_input_is_named(ext, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(ext)
