"""Autotune machinery shared by every kernel family in `kernels/`.

Each family keeps its autotune configs per input family ("lowp" for bf16 / fp16 on tensor cores, "fp32" for exact
fp32 dots) and launches its kernels through a `Tuned`: one autotuner per input family, and the interpreted twin
for CPU tensors. Each family's `aot_launch` over its `AOT_DIMENSIONS` runs its launchers so as to reach every
variant they compile, which tests/test_triton_aot.py builds for sm_90 / sm_80 with no GPU (`aot.py`).
"""
import torch
import triton
from torch.library import wrap_triton

from .interpreted import interpreting, twin


def config(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


class Tuned:
    """A kernel's autotuners, picked per launch by the tensors it runs on: compiled over the GPU configs of the
    input family for CUDA tensors (through `wrap_triton`, so torch.compile sees the kernel); for CPU tensors its
    interpreted twin, with one 16-wide config of the same block names (fast under the interpreter; the launchers
    also upcast tiles to fp32 there, since the interpreter does arithmetic on the raw bits of bf16 values)."""

    def __init__(self, kernel, configs: dict, **autotune_kwargs):
        self.kernel = kernel
        self.autotune_kwargs = autotune_kwargs
        self.compiled = {name: triton.autotune(family_configs, **autotune_kwargs)(kernel)
                         for name, family_configs in configs.items()}
        blocks = next(iter(configs.values()))[0].kwargs
        self.interpreted_configs = [config(4, 1, **{block: 16 for block in blocks})]
        self._interpreted = None  # made on the first launch on CPU tensors

    def __call__(self, t: torch.Tensor):
        """The autotuner to launch with `[grid](...)` on tensors like `t` (device and dtype)."""
        if not interpreting(t):
            return wrap_triton(self.compiled[family(t.dtype)])
        if self._interpreted is None:
            self._interpreted = triton.autotune(self.interpreted_configs, **self.autotune_kwargs)(twin(self.kernel))
        return self._interpreted

    def configs_for(self, t: torch.Tensor) -> list:
        """The configs that a launch on tensors like `t` chooses from."""
        return self.interpreted_configs if interpreting(t) else self.compiled[family(t.dtype)].configs


def precision(dtype: torch.dtype) -> str:
    """`ieee` (exact fp32) for fp32 inputs; `tf32` for the fp32-operand dots of bf16 / fp16 inputs (exact for
    their input-dtype operand). Dots with two bf16 / fp16 operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
