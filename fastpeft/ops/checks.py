"""Input validation shared by the public op entry points: errors name the argument, the expectation and the value."""
import math

import torch

# float64 runs on the reference backend (see fastpeft.backends.choose): exact, e.g. for torch.autograd.gradcheck.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, dim: int | None = None, shape: tuple | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None allowed) shares `reference`'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; cast them to one dtype")
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_probability(name: str, p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def check_finite(name: str, value) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_seed(seed) -> None:
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"seed must be None or an int in [0, 2**31), got {seed!r}")
