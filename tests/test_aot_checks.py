"""The ahead-of-time checks of tests/test_triton_aot.py can fail: test-only kernels built through the same path
(kernels/aot.py) that spill registers, ask for more shared memory than an A100 has, or run their loop without a
tensor-core dot, are each rejected by the check that guards against it."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpeft.kernels import aot  # noqa: E402
from fastpeft.kernels.ptx_checks import in_a_loop, ptxas_usage  # noqa: E402
from test_triton_aot import SMEM_LIMIT, shared_memory_failures, spill_failures, wgmma_failures  # noqa: E402


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """A [BLOCK, BLOCK] fp32 tile held live across a loop by one warp: 512 values a thread at BLOCK = 128."""
    offs = tl.arange(0, BLOCK)
    ptrs = x_ptr + offs[:, None] * BLOCK + offs[None, :]
    acc = tl.load(ptrs)
    for i in range(4):
        acc = acc * tl.load(ptrs + i) + acc
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _loop_without_dot_kernel(x_ptr, w_ptr, out_ptr, K, BLOCK: tl.constexpr):
    """A 'GEMM' whose K loop only adds tiles; its one tl.dot is in the epilogue."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        acc += tl.load(x_ptr + offs[:, None] * K + k0 + offs[None, :]).to(tl.float32)
    w = tl.load(w_ptr + offs[:, None] * BLOCK + offs[None, :])
    acc = tl.dot(acc.to(tl.bfloat16), w, acc)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, K, BLOCK_MN: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_MN, BLOCK_MN] tile of x @ w (both [*, K] row-major, K a multiple of BLOCK_K)."""
    offs = tl.arange(0, BLOCK_MN)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_MN, BLOCK_MN), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs[:, None] * K + k0 + offs_k[None, :])
        w = tl.load(w_ptr + offs[None, :] * K + k0 + offs_k[:, None])
        acc = tl.dot(x, w, acc)
    tl.store(out_ptr + offs[:, None] * BLOCK_MN + offs[None, :], acc)


def _result(kernel, arch, args, tensor_core_loop=False, **kwargs):
    """A result row as tests/test_triton_aot.py makes it, for a launch of `kernel` built through kernels/aot.py."""
    launch = aot.Launch(kernel, args, kwargs)
    compiled = aot.build(launch, arch)
    ptx = compiled.asm["ptx"]
    return {"kernel": kernel.fn.__name__, "arch": arch, "dtype": "bf16", "variant": kwargs,
            "num_warps": kwargs["num_warps"], "num_stages": kwargs.get("num_stages", 3),
            "shared": compiled.metadata.shared, "tensor_core_loop": tensor_core_loop,
            "wgmma_in_loop": in_a_loop(ptx, "wgmma.mma_async"), "ptx": ptx, **ptxas_usage(compiled, arch)}


def test_spilling_kernel_is_rejected():
    x = torch.empty(128, 128)
    result = _result(_spilling_kernel, 80, (x, x), BLOCK=128, num_warps=1)
    assert result["spill_stores"] > 0 and spill_failures([result])


def test_loop_without_tensor_core_dot_is_rejected_though_its_epilogue_has_wgmma():
    x, w = torch.empty(64, 256, dtype=torch.bfloat16), torch.empty(64, 64, dtype=torch.bfloat16)
    result = _result(_loop_without_dot_kernel, 90, (x, w, torch.empty(64, 64), 256), tensor_core_loop=True,
                     BLOCK=64, num_warps=4)
    assert "wgmma.mma_async" in result["ptx"], "the old check (wgmma anywhere in the PTX) would pass it"
    assert not result["wgmma_in_loop"] and wgmma_failures([result])


def test_shared_memory_beyond_an_a100_is_rejected_and_a_real_gemm_loop_passes():
    """A 256 x 256 x 64 bf16 tile pipelined 4 deep asks for about 192 KB on sm_80; the same GEMM on sm_90 at
    64 x 64 issues wgmma in its loop (the checks' positive control)."""
    x, w = torch.empty(256, 256, dtype=torch.bfloat16), torch.empty(256, 256, dtype=torch.bfloat16)
    big = _result(_gemm_kernel, 80, (x, w, torch.empty(256, 256), 256), BLOCK_MN=256, BLOCK_K=64, num_warps=8,
                  num_stages=4)
    assert big["shared"] > SMEM_LIMIT[80] and shared_memory_failures([big])
    small = _result(_gemm_kernel, 90, (x, w, torch.empty(256, 256), 256), tensor_core_loop=True, BLOCK_MN=64,
                    BLOCK_K=64, num_warps=4, num_stages=3)
    assert small["wgmma_in_loop"] and not wgmma_failures([small]) and not shared_memory_failures([small])
