"""Every bottleneck-adapter backend against the float64 reference (forward, all gradients), reproducibility and
input validation."""
import pytest
import torch
from hypothesis import given

from adapter_cases import AdapterCase, adapter_cases, check_backend
from budget import examples
from fastpeft.ops.adapter import bottleneck_adapter


@pytest.mark.parametrize("backend", ["torch", "ext"])
@examples(60)
@given(case=adapter_cases())
def test_cpu_backends_match_reference(backend, case):
    check_backend(backend, case)


@examples(25)
@given(case=adapter_cases(max_rows=24, max_d=40, max_m=40))
def test_triton_interpreted_matches_reference(case):
    check_backend("triton", case)


@pytest.mark.parametrize("m", [1, 16, 17, 200, 256])  # pad boundaries of the on-chip bottleneck
def test_triton_widths(m):
    for dtype, p, act in [(torch.float32, 0.0, "gelu"), (torch.bfloat16, 0.25, "silu")]:
        check_backend("triton", AdapterCase((), 19, 21, m, dtype, act, True, True, False, p, "contiguous", True,
                                            1.5, m))


@pytest.mark.parametrize("backend", ["torch", "ext", "triton"])
def test_wide_bottleneck_on_cpu_backends(backend):
    m = 300 if backend != "triton" else 256
    check_backend(backend, AdapterCase((2,), 5, 33, m, torch.float32, "relu", True, True, True, 0.1, "contiguous",
                                       True, 0.5, 11))


def _adapter_inputs(dtype=torch.float32, rows=6, d=10, m=4):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(rows, d), make(m, d), make(m), make(d, m), make(d)


@pytest.mark.parametrize("backend", ["reference", "torch", "ext", "triton"])
def test_same_seed_same_result_other_seed_other_mask(backend):
    def run(seed):
        tensors = _adapter_inputs()
        y = bottleneck_adapter(*tensors, "gelu", 2.0, dropout_p=0.5, seed=seed, backend=backend)
        y.backward(torch.ones_like(y))
        return [y.detach()] + [t.grad for t in tensors]

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_eval_mode_ignores_dropout():
    tensors = _adapter_inputs()
    y = bottleneck_adapter(*tensors, dropout_p=0.5, training=False, backend="torch")
    assert torch.equal(y, bottleneck_adapter(*tensors, dropout_p=0.0, backend="torch"))


def test_empty_batch_returns_empty_output():
    h = torch.zeros(0, 4, requires_grad=True)
    y = bottleneck_adapter(h, torch.randn(2, 4, requires_grad=True), None, torch.randn(4, 2), None)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert h.grad.shape == (0, 4)


def args(**override):
    h, w_down, b_down, w_up, b_up = (t.detach() for t in _adapter_inputs(rows=3, d=8, m=2))
    base = dict(h=h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    base.update(override)
    return base


@pytest.mark.parametrize("override, error, message", [
    (dict(h=torch.randn(3, 7)), ValueError, r"h's last dimension must equal w_down's in_features 8, got h of shape \(3, 7\)"),
    (dict(w_down=torch.randn(2, 8, 1)), ValueError, r"w_down must be 2-D, got shape \(2, 8, 1\)"),
    (dict(w_up=torch.randn(8, 3)), ValueError, r"w_up must have shape \(8, 2\), got \(8, 3\)"),
    (dict(w_down=torch.randn(0, 8), w_up=torch.randn(8, 0)), ValueError, r"bottleneck width must be >= 1"),
    (dict(b_down=torch.randn(3)), ValueError, r"b_down must have shape \(2,\), got \(3,\)"),
    (dict(b_up=torch.randn(2)), ValueError, r"b_up must have shape \(8,\), got \(2,\)"),
    (dict(residual=torch.randn(4, 8)), ValueError, r"residual must have shape \(3, 8\), got \(4, 8\)"),
    (dict(w_up=torch.ones(8, 2, dtype=torch.int32)), TypeError, r"w_up must be float32, bfloat16, float16 or float64"),
    (dict(b_up=torch.randn(8, dtype=torch.bfloat16)), TypeError, r"b_up has dtype torch.bfloat16 but h has torch.float32"),
    (dict(residual=torch.randn(3, 8, device="meta")), ValueError, r"residual is on meta but h is on cpu"),
    (dict(h=[[1.0] * 8]), TypeError, r"h must be a torch.Tensor, got list"),
    (dict(activation="tanh"), ValueError, r"activation must be one of \('relu', 'gelu', 'silu'\), got 'tanh'"),
    (dict(scaling=float("nan")), ValueError, r"scaling must be a finite number, got nan"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    (dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be None or an int in"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
])
def test_bad_input_is_named(override, error, message):
    with pytest.raises(error, match=message):
        bottleneck_adapter(**args(**override))


def test_forced_triton_beyond_its_width_is_an_error():
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match="bottleneck widths up to 256, got 257"):
        bottleneck_adapter(h, torch.randn(257, 8), None, torch.randn(8, 257), None, backend="triton")


@pytest.mark.gpu
@examples(60)
@given(case=adapter_cases(max_rows=300, max_d=300, max_m=256))
def test_triton_on_gpu_matches_reference(case):
    check_backend("triton", case, device="cuda")
