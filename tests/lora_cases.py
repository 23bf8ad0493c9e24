"""Hypothesis strategy and runner for LoRA-op property tests, shared by the CPU and GPU suites."""
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from fastpeft.ops.lora import lora_linear, lora_linear_ref
from layouts import with_layout
from numerics import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class LoraCase:
    lead: tuple  # leading batch dims before the row dim
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    bias: bool
    dropout_p: float
    layout: str  # of x: "contiguous", "strided" (every other column), "transposed" (rows are the fast dim)
    weight_transposed: bool  # a transposed view, as LoraLinear passes for GPT-2 Conv1D
    weight_trainable: bool
    scaling: float
    seed: int
    frozen: tuple = ()  # of "x", "lora_a", "lora_b": need no gradient (x: a model's first layer; A or B alone trains)


# What may need no gradient: never both factors, or nothing but the frozen base would be left to train.
FROZEN = [(), (), ("x",), ("lora_a",), ("lora_b",), ("x", "lora_a"), ("x", "lora_b")]


@st.composite
def lora_cases(draw, max_m=40, max_kn=48, min_r=1, max_r=64, dtypes=tuple(DTYPES)):
    return LoraCase(
        lead=draw(st.sampled_from([(), (), (1,), (2,), (2, 3)])),
        m=draw(st.integers(1, max_m)),
        k=draw(st.integers(1, max_kn)),
        n=draw(st.integers(1, max_kn)),
        r=draw(st.integers(min_r, max_r)),
        dtype=draw(st.sampled_from(dtypes)),
        bias=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        weight_transposed=draw(st.booleans()),
        weight_trainable=draw(st.booleans()),
        scaling=draw(st.floats(0.25, 4.0)),
        seed=draw(st.integers(0, 2**31 - 2)),
        frozen=draw(st.sampled_from(FROZEN)),
    )


def make_inputs(case: LoraCase, device="cpu"):
    """float64 contents of (x, weight, bias, lora_a, lora_b) and the upstream gradient; O(1) outputs."""
    g = torch.Generator().manual_seed(case.seed)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(*case.lead, case.m, case.k, **f64)
    weight = torch.randn(case.n, case.k, **f64) / case.k**0.5
    bias = torch.randn(case.n, **f64) if case.bias else None
    lora_a = torch.randn(case.r, case.k, **f64) / case.k**0.5
    lora_b = torch.randn(case.n, case.r, **f64) / case.r**0.5
    dy = torch.randn(*case.lead, case.m, case.n, **f64)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (x, weight, bias, lora_a, lora_b)], move(dy)


def _leaves(tensors, case: LoraCase, dtype):
    x, weight, bias, lora_a, lora_b = (None if t is None else t.detach().clone() for t in tensors)
    x = with_layout(x, case.layout, dtype)
    weight = with_layout(weight, "transposed" if case.weight_transposed else "contiguous", dtype)
    leaves = [x, weight, None if bias is None else bias.to(dtype), lora_a.to(dtype), lora_b.to(dtype)]
    trainable = ("x" not in case.frozen, case.weight_trainable, case.weight_trainable, "lora_a" not in case.frozen,
                 "lora_b" not in case.frozen)
    return [None if t is None else t.requires_grad_(want) for t, want in zip(leaves, trainable)]


def _run(fn, leaves, dy):
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    grads = [t.grad if t is not None and t.requires_grad else None for t in leaves]
    return y.detach(), grads


def check_backend(backend: str, case: LoraCase, device="cpu") -> None:
    """Forward and every gradient of `backend` against float64 with the 2x-PyTorch-error budget."""
    tensors, dy = make_inputs(case, device)
    ref = lambda *t: lora_linear_ref(*t, case.scaling, case.dropout_p, case.seed)  # noqa: E731
    fast = lambda *t: lora_linear(*t, case.scaling, case.dropout_p, True, case.seed, backend)  # noqa: E731
    exact = _run(ref, _leaves(tensors, case, torch.float64), dy)
    scale = _run(ref, _leaves([None if t is None else t.abs() for t in tensors], case, torch.float64), dy.abs())
    plain = _run(ref, _leaves(tensors, case, case.dtype), dy)
    got = _run(fast, _leaves(tensors, case, case.dtype), dy)
    assert_close_to_reference("y", got[0], exact[0], plain[0], case.dtype, scale[0])
    for name, g, e, p, s in zip(("dx", "dweight", "dbias", "dlora_a", "dlora_b"), got[1], exact[1], plain[1], scale[1]):
        if e is None:
            assert g is None, f"{name}: gradient given for a tensor that does not require one"
            continue
        assert_close_to_reference(name, g, e, p, case.dtype, s)
