"""Choose the implementation of an op per call.

`triton` on CUDA tensors when Triton is importable (forced on CPU tensors, it runs the kernels through Triton's
interpreter: slow, for tests), `ext` where the compiled CPU extension is built, `torch` (hand-fused PyTorch)
everywhere else, `reference` (plain PyTorch, the test oracle) on request and for float64, which no kernel is built
for.
`FASTPEFT_BACKEND=auto|triton|ext|torch|reference` or an op's `backend=` argument forces one; a forced backend that
cannot run here is an error, never a silent fallback.
"""
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "ext", "torch", "reference")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> tuple[bool, str]:
    if not triton_importable():
        return False, "Triton is not installed"
    if device.type in ("cuda", "cpu"):  # compiled on CUDA tensors, interpreted on CPU ones
        return True, ""
    return False, f"Triton kernels need CUDA tensors, or CPU tensors for the interpreter (got device {device})"


def ext_usable(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"the compiled extension is CPU-only (got device {device})"
    from fastpeft import _ext

    if _ext.load() is None:
        return False, "the compiled CPU extension is not available (no compiler, build failed, or FASTPEFT_NO_EXT=1)"
    return True, ""


def ext_ops():
    """`torch.ops.fastpeft`, for ops that run only after `choose` picked "ext" (which loaded the library); reading
    torch.ops directly keeps torch.compile from tracing the loader."""
    return torch.ops.fastpeft


def requested(backend: str | None = None) -> str:
    name = backend if backend is not None else os.environ.get("FASTPEFT_BACKEND", "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else "FASTPEFT_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@torch.compiler.assume_constant_result  # fixed for a process: torch.compile bakes the choice into its graph
def choose(device: torch.device, backend: str | None = None, ext_helps: bool = True,
           dtype: torch.dtype | None = None) -> str:
    """The backend to run on `device` for inputs of `dtype`. `ext_helps=False` when the extension adds nothing for
    this call."""
    name = requested(backend)
    if dtype == torch.float64:
        if name in ("triton", "ext"):
            raise RuntimeError(f"backend {name!r} was requested but cannot run: it takes float32, bfloat16 and "
                               "float16, got float64 (which runs on the reference backend)")
        return "reference"
    if name == "auto":
        if device.type == "cuda" and triton_usable(device)[0]:
            return "triton"
        if ext_helps and device.type == "cpu" and ext_usable(device)[0]:
            return "ext"
        return "torch"
    check = {"triton": triton_usable, "ext": ext_usable}.get(name)
    if check is not None:
        ok, why = check(device)
        if not ok:
            raise RuntimeError(f"backend {name!r} was requested but cannot run: {why}")
    return name
