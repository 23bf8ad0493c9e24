"""Hypothesis strategy and runner for bottleneck-adapter property tests, shared by the CPU and GPU suites."""
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from fastpeft.ops.adapter import ACTIVATIONS, bottleneck_adapter, bottleneck_adapter_ref
from layouts import with_layout
from numerics import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_NAMES = ("dh", "dw_down", "db_down", "dw_up", "db_up", "dresidual")


@dataclass
class AdapterCase:
    lead: tuple  # leading batch dims before the row dim
    rows: int
    d: int  # hidden size
    m: int  # bottleneck width
    dtype: torch.dtype
    activation: str
    bias_down: bool
    bias_up: bool
    residual: bool  # an explicit residual (else h itself)
    dropout_p: float
    layout: str  # of h: "contiguous", "strided" (every other column), "transposed" (rows are the fast dim)
    h_trainable: bool
    scaling: float
    seed: int
    frozen: tuple = ()  # of "w_down", "b_down", "w_up", "b_up": adapter weights that need no gradient


# Frozen adapter weights: the up or the down projection alone trains (one weight always does, so that something
# needs a gradient where h does not).
FROZEN = [(), (), ("w_down", "b_down"), ("w_up", "b_up"), ("w_down", "b_down", "b_up")]


def on_relu_grid(case) -> bool:
    """relu with bf16 / fp16 inputs: a rounding that moves a pre-activation across 0 flips relu's derivative and
    costs an O(1) gradient error that no rounding budget covers, and PyTorch (matmul rounded before the bias add)
    and a fused path round differently. So such cases draw h, w_down, b_down on a grid (multiples of 1/4, 1/8,
    1/32) with exact 1/(1-p): every pre-activation is 0 or at least 1/32 from the kink, far beyond rounding."""
    return case.activation == "relu" and case.dtype != torch.float32


@st.composite
def adapter_cases(draw, max_rows=40, max_d=48, max_m=64, dtypes=tuple(DTYPES)):
    case = AdapterCase(
        lead=draw(st.sampled_from([(), (), (1,), (2,), (2, 3)])),
        rows=draw(st.integers(1, max_rows)),
        d=draw(st.integers(1, max_d)),
        m=draw(st.integers(1, max_m)),
        dtype=draw(st.sampled_from(dtypes)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        bias_down=draw(st.booleans()),
        bias_up=draw(st.booleans()),
        residual=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        h_trainable=draw(st.sampled_from([True, True, False])),
        scaling=draw(st.floats(0.25, 4.0)),
        seed=draw(st.integers(0, 2**31 - 2)),
        frozen=draw(st.sampled_from(FROZEN)),
    )
    if on_relu_grid(case) and case.dropout_p not in (0.0, 0.5):
        case.dropout_p = 0.5  # 1/(1-p) = 2 is exact
    return case


def make_inputs(case: AdapterCase, device="cpu"):
    """float64 (h, w_down, b_down, w_up, b_up, residual) and the upstream gradient; O(1) activations."""
    g = torch.Generator().manual_seed(case.seed)
    f64 = dict(generator=g, dtype=torch.float64)
    h = torch.randn(*case.lead, case.rows, case.d, **f64)
    w_down = torch.randn(case.m, case.d, **f64) / case.d**0.5
    b_down = torch.randn(case.m, **f64) if case.bias_down else None
    w_up = torch.randn(case.d, case.m, **f64) / case.m**0.5
    b_up = torch.randn(case.d, **f64) if case.bias_up else None
    residual = torch.randn(*case.lead, case.rows, case.d, **f64) if case.residual else None
    dy = torch.randn(*case.lead, case.rows, case.d, **f64)
    if on_relu_grid(case):
        h, w_down = (h * 4).round() / 4, (w_down * 8).round() / 8
        b_down = None if b_down is None else (b_down * 32).round() / 32
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (h, w_down, b_down, w_up, b_up, residual)], move(dy)


def _leaves(tensors, case: AdapterCase, dtype):
    h, *rest = (None if t is None else t.detach() for t in tensors)
    leaves = [with_layout(h, case.layout, dtype)] + [None if t is None else t.to(dtype).clone() for t in rest]
    trainable = (case.h_trainable, *(name not in case.frozen for name in ("w_down", "b_down", "w_up", "b_up")), True)
    return [None if t is None else t.requires_grad_(want) for t, want in zip(leaves, trainable)]


def _run(fn, leaves, dy):
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


def check_backend(backend: str, case: AdapterCase, device="cpu") -> None:
    """Forward and every gradient of `backend` against float64 with the 2x-PyTorch-error budget."""
    tensors, dy = make_inputs(case, device)

    def ref(h, w_down, b_down, w_up, b_up, residual):
        return bottleneck_adapter_ref(h, w_down, b_down, w_up, b_up, case.activation, case.scaling, residual,
                                      case.dropout_p, case.seed)

    def fast(h, w_down, b_down, w_up, b_up, residual):
        return bottleneck_adapter(h, w_down, b_down, w_up, b_up, case.activation, case.scaling, residual,
                                  case.dropout_p, True, case.seed, backend)

    exact = _run(ref, _leaves(tensors, case, torch.float64), dy)
    # The error scale: the same computation on absolute values (|act| bounds the activation's magnitude).
    scale = _run(ref, _leaves([None if t is None else t.abs() for t in tensors], case, torch.float64), dy.abs())
    plain = _run(ref, _leaves(tensors, case, case.dtype), dy)
    got = _run(fast, _leaves(tensors, case, case.dtype), dy)
    assert_close_to_reference("y", got[0], exact[0], plain[0], case.dtype, scale[0])
    for name, g, e, p, s in zip(GRAD_NAMES, got[1], exact[1], plain[1], scale[1]):
        if e is None:
            assert g is None, f"{name}: gradient given for a tensor that does not require one"
            continue
        assert_close_to_reference(name, g, e, p, case.dtype, s)
