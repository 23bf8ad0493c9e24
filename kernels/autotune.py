"""Autotune and ahead-of-time compile machinery shared by every kernel family in `kernels/`.

Each family keeps its autotune configs per input family ("lowp" for bf16 / fp16 on tensor cores, "fp32" for exact
fp32 dots), builds one autotuner per family with `autotuned`, and registers its jit kernels as `KernelSpec`s in a
`KERNELS` list, which tests/test_triton_aot.py compiles for sm_90 / sm_80 with no GPU.
"""
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton

# Under TRITON_INTERPRET=1 (CPU tests) one small config keeps runs fast, and tiles are upcast to fp32 right
# after loading because the interpreter does arithmetic on the raw bits of bf16 values.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def config(warps, stages, **blocks):
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def family(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "lowp"


def autotuned(kernel, configs: dict, **autotune_kwargs) -> dict:
    """One autotuner per input family; under the interpreter one 16-wide config with the same block names."""
    tuned = {}
    for name, family_configs in configs.items():
        if INTERPRET:
            family_configs = [config(4, 1, **{block: 16 for block in family_configs[0].kwargs})]
        tuned[name] = triton.autotune(family_configs, **autotune_kwargs)(kernel)
    return tuned


def precision(dtype: torch.dtype) -> str:
    """`ieee` (exact fp32) for fp32 inputs; `tf32` for the fp32-operand dots of bf16 / fp16 inputs (exact for
    their input-dtype operand). Dots with two bf16 / fp16 operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelSpec:
    """One jit kernel, its GPU autotune configs, and how to build its ahead-of-time signature."""
    name: str
    fn: object  # the @triton.jit function (not an autotuner)
    configs: dict  # input family ("lowp" / "fp32") -> GPU configs
    ptr_types: dict  # pointer arguments of a fixed type, e.g. {"s_ptr": "*fp32"}; the others take the input dtype
    constexprs: Callable[[torch.dtype], dict]  # the non-tuned constexprs, worst case (rank 64, dropout on)
    gemm: bool  # a big tensor-core GEMM: its bf16 / fp16 sm_90 builds must use wgmma
    dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)

    def configs_for(self, dtype: torch.dtype) -> list:
        return self.configs[family(dtype)]

    def signature(self, dtype: torch.dtype, config) -> tuple:
        """(signature, constexprs) for `triton.compiler.ASTSource` with this config's block sizes."""
        constexprs = {**self.constexprs(dtype), **config.kwargs}
        signature = {}
        for name in inspect.signature(getattr(self.fn, "fn", self.fn)).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = self.ptr_types.get(name, "*" + _TRITON_DTYPE[dtype])
            elif name in ("scaling", "keep_scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        return signature, constexprs
