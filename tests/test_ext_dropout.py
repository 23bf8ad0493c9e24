"""The compiled CPU dropout ops (csrc/lora_dropout.cpp) against fastpeft.ops.dropout's mask.

Exactness: every output is computed in fp32 and rounded once to the input dtype, so it must equal, bit for
bit, the same computation done by torch in fp32 with the reference mask.
"""
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastpeft import _ext
from fastpeft.ops.dropout import dropout_ref, keep_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "column-strided", "row-padded"]

seeds = st.integers(-(2**63), 2**63 - 1)
sizes = st.integers(1, 67)
probabilities = st.one_of(st.just(0.0), st.floats(0.0, 0.95))


@pytest.fixture(scope="module")
def ext():
    """The extension; its absence fails the suite wherever a compiler could have built it."""
    ops = _ext.load()
    if ops is None:
        if os.environ.get("FASTPEFT_NO_EXT") == "1":
            pytest.skip("FASTPEFT_NO_EXT=1 turns the compiled extension off")
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is installed ({compiler}) but fastpeft._ext.load() returned None")
        pytest.skip("no C++ compiler on this machine")
    return ops


def make_2d(rows: int, cols: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """A random [rows, cols] tensor laid out as asked (a view into a larger or transposed storage)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        base = torch.randn(rows, cols, generator=gen)
    elif layout == "transposed":
        base = torch.randn(cols, rows, generator=gen).t()
    elif layout == "column-strided":
        base = torch.randn(rows, 2 * cols, generator=gen)[:, ::2]
    else:  # rows padded: unit column stride, row stride > cols
        base = torch.randn(rows, cols + 3, generator=gen)[:, 1 : cols + 1]
    return base.to(dtype)


def expected_dropout(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    return (x.float() * mask * (1.0 / (1.0 - p))).to(x.dtype)


@given(seed=seeds, rows=sizes, cols=sizes, p=probabilities)
def test_mask_is_the_reference_mask(ext, seed, rows, cols, p):
    mask = ext.dropout_mask(seed, rows, cols, p)
    assert mask.dtype == torch.bool and mask.shape == (rows, cols)
    assert torch.equal(mask, keep_mask(seed, rows, cols, p))


@given(seed=seeds, rows=sizes, cols=sizes, p=probabilities, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), data_seed=st.integers(0, 2**31))
def test_forward_is_masked_scaled_input(ext, seed, rows, cols, p, dtype, layout, data_seed):
    x = make_2d(rows, cols, dtype, layout, data_seed)
    xd = ext.dropout_forward(x, torch.tensor(seed), p)
    assert xd.dtype == dtype and xd.shape == x.shape and xd.is_contiguous()
    assert torch.equal(xd, expected_dropout(x, keep_mask(seed, rows, cols, p), p))
    if dtype == torch.float32:
        assert torch.equal(xd, dropout_ref(x, p, seed))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_over_threads_give_the_same_bits(ext, threads):
    rows, cols, p, seed = 1031, 97, 0.3, 12345  # ~100k elements: several pieces of work per thread
    x = make_2d(rows, cols, torch.float32, "transposed", 1)
    mask = keep_mask(seed, rows, cols, p)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(ext.dropout_mask(seed, rows, cols, p), mask)
        xd = ext.dropout_forward(x, torch.tensor(seed), p)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(xd, dropout_ref(x, p, seed))


def test_empty_input(ext):
    assert ext.dropout_forward(torch.empty(0, 5), torch.tensor(1), 0.5).shape == (0, 5)
    assert ext.dropout_mask(1, 3, 0, 0.5).shape == (3, 0)


def test_meta_tensors_give_shapes_for_tracing(ext):
    x = torch.empty(5, 7, device="meta", dtype=torch.bfloat16)
    xd = ext.dropout_forward(x, torch.tensor(3), 0.1)
    assert xd.shape == (5, 7) and xd.device.type == "meta" and xd.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_pass_torch_library_opcheck(ext, dtype):
    """Schemas and meta (fake) kernels hold up under torch.compile's tracing."""
    x = make_2d(6, 5, dtype, "transposed", 1)
    torch.library.opcheck(torch.ops.fastpeft.dropout_forward.default, (x, torch.tensor(3), 0.2))
    torch.library.opcheck(torch.ops.fastpeft.dropout_mask.default, (3, 6, 5, 0.2))


SEED = torch.tensor(0)  # the ops' seed: a one-element int64 tensor


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.dropout_forward(_x(2, 3, 4), SEED, 0.1), "x must be 2-D"),
    (lambda e: e.dropout_forward(_x(4), SEED, 0.1), "x must be 2-D"),
    (lambda e: e.dropout_forward(_x(2, 3, dtype=torch.float64), SEED, 0.1), "x dtype must be float32, bfloat16 or"),
    (lambda e: e.dropout_forward(_x(2, 3), SEED, 1.0), "p must satisfy 0 <= p < 1"),
    (lambda e: e.dropout_forward(_x(2, 3), SEED, -0.1), "p must satisfy 0 <= p < 1"),
    (lambda e: e.dropout_forward(_x(2, 3), SEED, float("nan")), "p must satisfy 0 <= p < 1"),
    (lambda e: e.dropout_mask(0, -1, 3, 0.1), "M and K must be >= 0"),
    (lambda e: e.dropout_mask(0, 2**32, 1, 0.1), "M must be below 2\\*\\*32"),
])
def test_bad_input_is_named(ext, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(ext)


def test_load_is_cached(ext):
    assert _ext.load() is ext and _ext.available()


def test_missing_compiler_warns_once_and_gives_none(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_aot_library", lambda: None)
    monkeypatch.setenv("CXX", "no-such-compiler-fastpeft")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert _ext.load.__wrapped__() is None


def test_no_ext_env_gives_none_quietly(monkeypatch):
    monkeypatch.setenv("FASTPEFT_NO_EXT", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load.__wrapped__() is None
