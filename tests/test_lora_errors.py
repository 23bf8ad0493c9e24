"""Bad input to lora_linear gets an error that names the argument, the expectation and what was given."""
import pytest
import torch

from fastpeft.ops.lora import lora_linear


def args(**override):
    base = dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_a=torch.randn(2, 8),
                lora_b=torch.randn(5, 2), scaling=1.0)
    base.update(override)
    return base


@pytest.mark.parametrize("override, error, message", [
    (dict(x=torch.randn(3, 7)), ValueError, r"x's last dimension must equal weight's in_features 8, got x of shape \(3, 7\)"),
    (dict(weight=torch.randn(5, 8, 1)), ValueError, r"weight must be 2-D, got shape \(5, 8, 1\)"),
    (dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a must have shape \(2, 8\), got \(2, 9\)"),
    (dict(lora_b=torch.randn(5, 3)), ValueError, r"lora_b must have shape \(5, 2\), got \(5, 3\)"),
    (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(5, 0)), ValueError, r"LoRA rank must be >= 1"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\), got \(4,\)"),
    (dict(lora_b=torch.randn(5, 2, dtype=torch.float64)), TypeError, r"lora_b has dtype torch.float64 but x has torch.float32"),
    (dict(lora_a=torch.randn(2, 8, dtype=torch.bfloat16)), TypeError, r"lora_a has dtype torch.bfloat16 but x has torch.float32"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, r"x must be float32, bfloat16, float16 or float64, got torch.int64"),
    (dict(lora_b=torch.randn(5, 2, device="meta")), ValueError, r"lora_b is on meta but x is on cpu"),
    (dict(x=[[1.0] * 8]), TypeError, r"x must be a torch.Tensor, got list"),
    (dict(scaling=float("inf")), ValueError, r"scaling must be a finite number, got inf"),
    (dict(x=torch.randn(3, 0), weight=torch.randn(5, 0), lora_a=torch.randn(2, 0)), ValueError,
     r"weight must have in_features >= 1, got weight of shape \(5, 0\)"),
    (dict(backend="triton", lora_a=torch.randn(65, 8), lora_b=torch.randn(5, 65)), ValueError,
     r"the triton backend supports LoRA ranks up to 64, got 65"),
])
def test_bad_tensors_are_named(override, error, message):
    with pytest.raises(error, match=message):
        lora_linear(**args(**override))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        lora_linear(**args(), dropout_p=p)


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be None or an int in"):
        lora_linear(**args(), dropout_p=0.1, seed=seed)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'ext', 'torch', 'reference'\), got 'cuda'"):
        lora_linear(**args(), backend="cuda")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of"):
        lora_linear(**args())


def test_forced_triton_without_triton_is_an_error_not_a_fallback(monkeypatch):
    from fastpeft import backends

    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run: Triton is not installed"):
        lora_linear(**args(), backend="triton")


def test_forced_triton_on_a_device_it_cannot_run_on_is_an_error():
    from fastpeft import backends

    with pytest.raises(RuntimeError, match="Triton kernels need CUDA tensors, or CPU tensors for the interpreter"):
        backends.choose(torch.device("meta"), "triton")


def test_forced_ext_when_disabled_is_an_error(monkeypatch):
    from fastpeft import _ext

    monkeypatch.setattr(_ext, "load", lambda: None)
    with pytest.raises(RuntimeError, match="backend 'ext' was requested but cannot run"):
        lora_linear(**args(), backend="ext", dropout_p=0.1)
