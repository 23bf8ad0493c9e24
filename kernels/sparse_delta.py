"""Sparse weight delta kernels (Triton): the values' gradient (SDDMM) and the weight update (scatter).

SDDMM   out[j] = sum_m a[m, r_j] * b[m, c_j]  for the sorted flat positions (r_j, c_j) of the mask, a [M, R],
        b [M, C] (dy and x of a linear layer, both row-major [M, *]); fp32 products and sums.
Scatter w[r_j, c_j] = round(base[j] + values[j]), summed in fp32, rounded once to w's dtype.

Coalescing decides the SDDMM's design. A nonzero needs a *column* of a and a column of b, strided by a whole row in
row-major storage. A program owns BLOCK_NNZ consecutive nonzeros and walks the M rows in [BLOCK_M, BLOCK_NNZ] tiles:
- a is read in place, the nonzeros along the tile's fast axis: sorted positions come in runs of one mask row r
  (neighbouring rows follow), so a warp reading one row m of a asks for a few adjacent elements, one or two
  sectors, and its requests merge.
- b's columns c_j are scattered over the row, so a tile of b read in place would use 2-4 bytes of each 32-byte
  sector. The launcher therefore transposes b once (bt = b^T, [C, M]: one more read and write of b, at memory
  speed), after which every nonzero's column is a contiguous row of bt, and a tile column is one coalesced read of
  BLOCK_M consecutive elements (256 bytes in every config).
The compiled layouts bear this out (TTGIR for sm_90): the a tile is loaded with the threads of a warp along the
nonzeros, the bt tile with them along m, and a is moved into bt's layout through shared memory for the product.
No tensor cores: each nonzero is an independent dot product of length M (nnz * M multiply-adds, a small fraction
of the dense dW GEMM at the densities of diff pruning); the kernel is bound by the loads. Products accumulate in a
[BLOCK_M, BLOCK_NNZ] fp32 tile (no cross-thread reduction inside the loop), summed over m once at the end.
Few nonzeros would leave the GPU idle, so the M rows are also split over a second grid axis; each split writes
its own row of fp32 partial sums, which the launcher adds up (deterministic, no atomics).
Designed without a GPU at hand: correct under the interpreter and compiled for sm_90 / sm_80, not yet timed.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .autotune import Tuned, config
from .interpreted import interpreting
from .layout import unit_stride

# [BLOCK_M, BLOCK_NNZ] tiles of 8K elements on 8 warps (a 32-register fp32 accumulator per thread; on 4 warps the
# accumulator, the two loaded tiles and their 64-bit pointer tiles spilled, as the AOT test found). bf16 / fp16
# take BLOCK_M = 128, fp32 BLOCK_M = 64 (256 contiguous bytes of a bt row either way); the second config of each
# family trades nonzeros for longer rows, for masks whose nonzeros spread over many mask rows.
CONFIGS = {
    "sddmm": {
        "lowp": [config(8, 3, BLOCK_NNZ=64, BLOCK_M=128), config(8, 3, BLOCK_NNZ=32, BLOCK_M=256)],
        "fp32": [config(8, 3, BLOCK_NNZ=128, BLOCK_M=64), config(8, 3, BLOCK_NNZ=64, BLOCK_M=128)],
    },
    "scatter": {
        "lowp": [config(4, 1, BLOCK=1024)],
        "fp32": [config(4, 1, BLOCK=1024)],
    },
}
# Split M until there are this many programs per streaming multiprocessor, but give a split at least
# MIN_SPLIT_ROWS rows (fewer under the interpreter, so that CPU tests cover several splits).
PROGRAMS_PER_SM = 4
MIN_SPLIT_ROWS = {True: 16, False: 512}  # by interpreting
SPLIT_ALIGN = 16  # rows per split a multiple of 16, so that bt's row offsets are known to be 16-aligned


@triton.jit
def _sddmm_kernel(
    a_ptr, bt_ptr, idx_ptr, out_ptr,  # a [M, R]; bt [C, M] (b transposed); idx [NNZ]; out fp32 [splits, NNZ]
    M, C, NNZ, ROWS_PER_SPLIT,
    stride_am, stride_ar, stride_btc,
    BLOCK_NNZ: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_j = tl.program_id(0) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    j_in = offs_j < NNZ
    position = tl.load(idx_ptr + offs_j, mask=j_in, other=0).to(tl.int64)
    row = position // C
    col = position - row * C
    split = tl.program_id(1)
    m_begin = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_begin + ROWS_PER_SPLIT, M)
    offs_m = tl.arange(0, BLOCK_M)
    rows_m = (m_begin + offs_m)[:, None].to(tl.int64)
    # [BLOCK_M, BLOCK_NNZ] tiles: neighbouring nonzeros (nearly the same column of a) lie along the fast axis of
    # the a tile; the bt tile is contiguous along m, so the compiler lays it out along m.
    a_ptrs = a_ptr + rows_m * stride_am + row[None, :] * stride_ar
    b_ptrs = bt_ptr + col[None, :] * stride_btc + rows_m
    acc = tl.zeros((BLOCK_M, BLOCK_NNZ), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        mask = (offs_m < m_end - m0)[:, None] & j_in[None, :]
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)  # fp32 right away (also for the interpreter)
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += a * b
        a_ptrs += BLOCK_M * stride_am
        b_ptrs += BLOCK_M
    tl.store(out_ptr + split * NNZ + offs_j, tl.sum(acc, axis=0), mask=j_in)


_sddmm = Tuned(_sddmm_kernel, CONFIGS["sddmm"], key=["M", "C", "NNZ"])


def _splits(a: torch.Tensor, nnz_blocks: int) -> int:
    """How many row ranges to split M into: enough programs to fill the GPU, each range worth a program."""
    M = a.shape[0]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 2
    return max(1, min(triton.cdiv(M, MIN_SPLIT_ROWS[interpreting(a)]), PROGRAMS_PER_SM * sms // max(nnz_blocks, 1)))


@triton_op("fastpeft_triton::sddmm", mutates_args=())
def sddmm(a: Tensor, b: Tensor, indices: Tensor) -> Tensor:
    """fp32 `[nnz]`: `(a^T b).flatten()[indices]` for a `[M, R]`, b `[M, C]` (any strides), indices sorted flat
    int32 / int64 positions in `[R, C]`."""
    indices = unit_stride(indices)  # a and bt are indexed in int64 (positions are)
    M = a.shape[0]
    C = b.shape[1]
    nnz = indices.numel()
    if nnz == 0 or M == 0:
        return torch.zeros(nnz, device=a.device, dtype=torch.float32)
    bt = b.t().contiguous()  # [C, M]: each nonzero's column of b is a contiguous row
    smallest_block = min(c.kwargs["BLOCK_NNZ"] for c in _sddmm.configs_for(a))
    splits = _splits(a, triton.cdiv(nnz, smallest_block))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, nnz), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(nnz, meta["BLOCK_NNZ"]), splits)
    _sddmm(a)[grid](a, bt, indices, partial, M, C, nnz, rows_per_split, a.stride(0), a.stride(1),
                    bt.stride(0))
    return partial.sum(0)  # a copy of the one row when there is one split (an op's output may not be a view)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, NaN kept a quiet NaN: c10's algorithm in integer ops, so the result
    is torch's bit for bit on the GPU and under the interpreter (whose own cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _scatter_kernel(
    w_ptr, base_ptr, values_ptr, idx_ptr,  # w [R, C]; base [NNZ] w's dtype; values [NNZ] any float; idx [NNZ]
    C, NNZ,
    stride_wr, stride_wc,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    j_in = offs < NNZ
    position = tl.load(idx_ptr + offs, mask=j_in, other=0).to(tl.int64)
    row = position // C
    total = (tl.load(base_ptr + offs, mask=j_in, other=0.0).to(tl.float32)
             + tl.load(values_ptr + offs, mask=j_in, other=0.0).to(tl.float32))
    if w_ptr.dtype.element_ty == tl.bfloat16:
        rounded = _round_to_bf16(total)
    else:
        rounded = total.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + row * stride_wr + (position - row * C) * stride_wc, rounded, mask=j_in)


_scatter = Tuned(_scatter_kernel, CONFIGS["scatter"], key=["NNZ"])


@triton_op("fastpeft_triton::scatter_delta_", mutates_args={"weight"})
def scatter_delta_(weight: Tensor, base_values: Tensor, values: Tensor, indices: Tensor) -> None:
    """weight[divmod(indices, C)] = base_values + values, summed in fp32 and rounded once, in place."""
    nnz = indices.numel()
    if nnz == 0:
        return
    base_values, values, indices = unit_stride(base_values), unit_stride(values), unit_stride(indices)
    grid = lambda meta: (triton.cdiv(nnz, meta["BLOCK"]),)
    _scatter(weight)[grid](weight, base_values, values, indices, weight.shape[1], nnz,
                           weight.stride(0), weight.stride(1))


# ---------------------------------------------------------------------------------------------------------------
# Launches that reach every compiled variant (kernels/aot.py builds them for sm_90 / sm_80 in tests/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------------------
AOT_DIMENSIONS = {  # worst case first
    "dtype": (torch.bfloat16, torch.float16, torch.float32),
    "index_dtype": (torch.int64, torch.int32),
}


def aot_launch(dtype, index_dtype):
    """Both launchers once, on contiguous 16-aligned operands (values fp32, as SparseDeltaLinear keeps them)."""
    rows, out_features, in_features, nnz = 256, 256, 256, 1024
    dy, x = torch.empty(rows, out_features, dtype=dtype), torch.empty(rows, in_features, dtype=dtype)
    indices = torch.arange(nnz, dtype=index_dtype) * 7
    sddmm(dy, x, indices)
    scatter_delta_(torch.empty(out_features, in_features, dtype=dtype), torch.empty(nnz, dtype=dtype),
                   torch.empty(nnz), indices)
