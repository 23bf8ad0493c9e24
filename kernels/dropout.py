"""Triton side of the shared counter-based dropout mask, bit-identical to `fastpeft.ops.dropout`.

An element at logical position (row, col) of the flattened `[M, K]` input is kept iff
    mix32(mix32(row ^ seed) + col * 0x9E3779B9) >= threshold          (uint32 arithmetic, mod 2**32)
Kernels hash a row vector once (`dropout_row_key`), a column vector once per K step (`dropout_col_key`),
and broadcast the two in `dropout_keep`, so a [BLOCK_M, BLOCK_K] mask costs one mix32 per element.
`dropout_args` turns a launcher's (p, seed tensor) into the kernels' dropout arguments; kernels load the seed
from its pointer, so the seed drawn by torch.compiled code stays a tensor of the graph (no `.item()` on the host).
"""
import torch
import triton
import triton.language as tl

from .interpreted import interpreting, twin


@triton.jit
def _mix32(h):
    """MurmurHash3's 32-bit finalizer on a uint32 tensor (the literals above 2**31 are uint32 in Triton)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_row_key(rows, seed):
    """mix32(row ^ seed) for an int32 vector of logical row indices and the seed (a kernel loads it from its
    int64 tensor; 0 <= seed < 2**31)."""
    return _mix32((rows ^ seed).to(tl.uint32))


@triton.jit
def dropout_col_key(cols):
    """col * golden-ratio constant for an int32 vector of logical column indices."""
    return cols.to(tl.uint32) * 0x9E3779B9


@triton.jit
def dropout_hash(row_key, col_key):
    """uint32 hash of every (row, col) pair of a row-key vector and a column-key vector: [rows, cols]."""
    return _mix32(row_key[:, None] + col_key[None, :])


@triton.jit
def dropout_keep(row_key, col_key, threshold):
    """Boolean [rows, cols] keep mask; `threshold` is `fastpeft.ops.dropout.keep_threshold(p)`."""
    return dropout_hash(row_key, col_key) >= threshold


@triton.jit(do_not_specialize=["seed"])
def dropout_hash_kernel(out_ptr, rows, cols, seed, BLOCK: tl.constexpr):
    """Writes the raw hash of a [rows, cols] grid (as int32 bits) so tests can compare it with the reference."""
    offs_r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h = dropout_hash(dropout_row_key(offs_r, seed), dropout_col_key(offs_c))
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    tl.store(out_ptr + offs_r[:, None] * cols + offs_c[None, :], h.to(tl.int32, bitcast=True), mask=mask)


def dropout_hash_grid(seed: int, rows: int, cols: int, device) -> torch.Tensor:
    """The uint32 hash (as int64) of every position of a `[rows, cols]` input, computed by the Triton helper (its
    interpreted twin on CPU); equals `fastpeft.ops.dropout.dropout_hash(seed, rows, cols)`."""
    out = torch.empty((rows, cols), dtype=torch.int32, device=device)
    block = 32
    kernel = twin(dropout_hash_kernel) if interpreting(out) else dropout_hash_kernel
    kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](out, rows, cols, seed, BLOCK=block)
    return out.to(torch.int64) & 0xFFFFFFFF


def dropout_args(p: float, seed: torch.Tensor, like: torch.Tensor):
    """Launcher arguments (seed tensor on `like`'s device, uint32 threshold, 1/(1-p), DROPOUT constexpr) for the
    one-element int64 `seed`; p == 0 compiles kernels with no RNG at all (and `like` stands in for the unread seed).
    The threshold is `fastpeft.ops.dropout.keep_threshold(p)` (kernels may not import fastpeft; a test checks)."""
    if p == 0.0:
        return like, 0, 1.0, False
    return seed.to(like.device), min(int(p * 2.0**32), 0xFFFFFFFF), 1.0 / (1.0 - p), True


AOT_DIMENSIONS = {}


def aot_launch():
    """The hash-only test kernel (its helpers are built into every dropout kernel of the other families)."""
    dropout_hash_grid(12345, 64, 64, "cpu")
