"""Fused LoRA linear kernels (Triton) and their launchers.

Forward   S = drop(x) @ a.T                     (fp32, saved for backward; never the dropped x)
          y = x @ w.T + bias + s * S @ b.T      (one GEMM; bias and the low-rank term in its epilogue)
Backward  G = s * dy @ b,  dB = s * dy.T @ S   (one pass over dy)
          dx = dy @ w + mask/(1-p) * (G @ a),  dA = G.T @ drop(x)   (one GEMM over [M, K] tiles)
Dropout masks are regenerated from (seed, row, col) by `kernels.dropout`, so nothing of size [M, K] is saved.

Numerics: every dot accumulates in fp32. fp32 inputs use exact fp32 dots (`ieee`). For bf16 / fp16 inputs the
big GEMMs run on bf16 / fp16 tensor cores, and the small dots that mix an fp32 operand (S or G, rank <= 64) with
an input-dtype operand run in tf32: bf16 and fp16 values are exact in tf32, so only S / G are rounded, to 10
mantissa bits (finer than casting them to bf16, at a cost that is small next to the main GEMM).
Dropout is applied as `where(keep, x, 0)` on the input-dtype tile (exact) and the 1/(1-p) factor multiplies the
fp32 accumulator, so dropout adds no rounding.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .autotune import Tuned, config, precision
from .interpreted import interpreting
from .dropout import dropout_args, dropout_col_key, dropout_keep, dropout_row_key
from .layout import int32_columns, unit_stride

# Grouped (swizzled) tile order: GROUP_M row-blocks share each column-block, so their operand tiles stay in L2.
GROUP_M = tl.constexpr(8)

# Autotune configs per input family: "lowp" (bf16 / fp16, tensor cores) and "fp32" (exact fp32 FMA dots, whose
# operand tiles take twice the shared memory and whose fully unrolled FMA code is slow to build, so the fp32
# lists hold fewer, smaller tiles). Every config fits the shared memory of both sm_80 (163 KB) and sm_90
# (227 KB) at rank 64; tests/test_triton_aot.py compiles each one for both and checks it. For instance the lowp
# 128x256x64 tile would need 192 KB in fp32, more than an A100 has, hence the separate fp32 list.
CONFIGS = {
    # Big GEMMs (forward y, backward dx). 128x256x64 and 128x128x64 are the H100 bf16 workhorses (wgmma on
    # 8 warps); 64x128 serves skinny or small problems.
    "gemm": {
        "lowp": [
            config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
            config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
            config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        ],
        "fp32": [
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=16),
            config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        ],
    },
    # The backward dx GEMM loops over N with [BLOCK_M, BLOCK_N] dy and [BLOCK_N, BLOCK_K] w tiles, so its reduction
    # block is BLOCK_N; its epilogue holds the x tile, its mask and G next to the accumulator. Launch-specialised
    # builds (the AOT test) found the forward's configs asking for 288 KB of pipelined shared memory on sm_90, and
    # [128, 128] output tiles spilling registers (so did 4 stages, or 64 x 128, on sm_80); these do neither.
    "dx": {
        "lowp": [
            config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
            config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
        ],
        "fp32": [
            config(8, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64),
            config(4, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64),
        ],
    },
    # Memory-bound passes over one activation (x for S, dy for G): wide K blocks stream it. BLOCK_M >= 64 so
    # that sm_90 builds use wgmma (one warpgroup covers 64 rows).
    "shrink": {
        "lowp": [
            config(4, 3, BLOCK_M=64, BLOCK_K=128),
            config(8, 3, BLOCK_M=128, BLOCK_K=64),
        ],
        "fp32": [config(4, 3, BLOCK_M=64, BLOCK_K=32)],
    },
    # One pass over dy for G and dB.
    "backward_shrink": {
        "lowp": [
            config(8, 3, BLOCK_M=64, BLOCK_N=128),  # 8 warps: 4 spilled on sm_80 at rank 64
            config(8, 3, BLOCK_M=128, BLOCK_N=64),
        ],
        "fp32": [config(4, 3, BLOCK_M=64, BLOCK_N=32)],
    },
    # Decode: all rows in one block; programs split N, so narrow N blocks give more programs to stream w
    # (N = 4096 with BLOCK_N = 32 is 128 programs, about one per H100 SM).
    "small": {
        "lowp": [
            config(4, 3, BLOCK_N=32, BLOCK_K=128),
            config(8, 4, BLOCK_N=64, BLOCK_K=128),  # 8 warps: 4 spilled on sm_80 at 64 rows
        ],
        "fp32": [config(4, 3, BLOCK_N=32, BLOCK_K=64)],
    },
}


def _r_pad(r: int) -> int:
    """tl.dot needs every dimension >= 16: ranks 1..64 are padded to a power of two >= 16 and masked."""
    return max(16, triton.next_power_of_2(r))


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n):
    """Maps a linear program id to (pid_m, pid_n), walking GROUP_M row-blocks per column-block."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------------------------
# S = drop(x) @ down.T   (also G = dy @ b with down = b.T, p = 0)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["drop_threshold"])
def _lora_shrink_kernel(
    x_ptr, down_ptr, out_ptr,  # x [M, K], down [R, K], out fp32 [M, R]
    M, K, R,
    stride_xm, stride_xk, stride_dr, stride_dk, stride_om,
    seed_ptr, drop_threshold, keep_scale,  # int64 dropout key (one element), uint32 drop threshold, 1 / (1 - p)
    DROPOUT: tl.constexpr,  # False compiles the mask away (p == 0)
    R_PAD: tl.constexpr,  # rank padded to a power of two >= 16 for tl.dot
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    d_ptrs = down_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk  # down.T tile [BLOCK_K, R_PAD]
    if DROPOUT:
        row_key = dropout_row_key(offs_m, tl.load(seed_ptr))
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        d = tl.load(d_ptrs, mask=k_in[:, None] & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            d = d.to(tl.float32)
        if DROPOUT:
            x = tl.where(dropout_keep(row_key, dropout_col_key(k0 + offs_k), drop_threshold), x, 0.0)
        acc = tl.dot(x, d, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        d_ptrs += BLOCK_K * stride_dk
    if DROPOUT:
        acc *= keep_scale
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


_lora_shrink = Tuned(_lora_shrink_kernel, CONFIGS["shrink"], key=["M", "K", "R"])


@triton_op("fastpeft_triton::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, down: Tensor, p: float, seed: Tensor) -> Tensor:
    """fp32 `[M, r] = dropout_p(x) @ down.T` for x `[M, K]`, down `[r, K]` (any strides), the mask keyed by the
    one-element int64 `seed`."""
    x, down = int32_columns(x), int32_columns(down)
    M, K = x.shape
    R = down.shape[0]
    out = torch.empty((M, R), device=x.device, dtype=torch.float32)
    seed, threshold, keep_scale, dropout = dropout_args(p, seed, x)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _lora_shrink(x)[grid](x, down, out, M, K, R, x.stride(0), x.stride(1), down.stride(0), down.stride(1),
                          out.stride(0), seed, threshold, keep_scale, DROPOUT=dropout, R_PAD=_r_pad(R),
                          PRECISION=precision(x.dtype), UPCAST=interpreting(x))
    return out


# ---------------------------------------------------------------------------------------------------------------
# y = x @ w.T + bias + scaling * S @ b.T
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,  # x [M, K], w [N, K], bias [N], S fp32 [M, R], b [N, R], y [M, N]
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge wrap onto valid ones (never stored), so the main loop masks only K.
    x_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # w.T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: + scaling * S_blk @ b_blk.T (rank R_PAD dot) + bias, one rounding to the output dtype.
    offs_r = tl.arange(0, R_PAD)
    m_in = offs_m < M
    n_in = offs_n < N
    r_in = offs_r < R
    s = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=r_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(s * scaling, bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


_lora_forward = Tuned(_lora_forward_kernel, CONFIGS["gemm"], key=["M", "N", "K", "R"])


@triton_op("fastpeft_triton::lora_forward", mutates_args=())
def lora_forward(x: Tensor, w: Tensor, bias: Tensor | None, s_mat: Tensor, b: Tensor, scaling: float) -> Tensor:
    """`y [M, N] = x @ w.T + bias + scaling * s_mat @ b.T` in x.dtype; s_mat fp32 `[M, r]`, b `[N, r]`."""
    x, w, b, bias = int32_columns(x), int32_columns(w), int32_columns(b), unit_stride(bias)
    M, K = x.shape
    N = w.shape[0]
    R = b.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_forward(x)[grid](x, w, bias if bias is not None else x, s_mat, b, y, M, N, K, R,
                           x.stride(0), x.stride(1), w.stride(0), w.stride(1), s_mat.stride(0), s_mat.stride(1),
                           b.stride(0), b.stride(1), y.stride(0), y.stride(1), float(scaling),
                           HAS_BIAS=bias is not None, R_PAD=_r_pad(R), PRECISION=precision(x.dtype),
                           UPCAST=interpreting(x))
    return y


# ---------------------------------------------------------------------------------------------------------------
# Decode-sized M: y and S in one launch; each program owns an N block and every row.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["drop_threshold"])
def _lora_forward_small_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, s_ptr,  # a [R, K]; S out fp32 [M, R] (written by program 0)
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    stride_sm,
    scaling, seed_ptr, drop_threshold, keep_scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # all M rows, padded to a power of two >= 16 (set by the launcher, not tuned)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    m_in = offs_m < M
    n_in = offs_n < N
    r_in = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # w.T tile
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # a.T tile [BLOCK_K, R_PAD]
    if DROPOUT:
        row_key = dropout_row_key(offs_m, tl.load(seed_ptr))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None], other=0.0)
        a = tl.load(a_ptrs, mask=k_in[:, None] & r_in[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if DROPOUT:
            x = tl.where(dropout_keep(row_key, dropout_col_key(k0 + offs_k), drop_threshold), x, 0.0)
        s = tl.dot(x, a, s, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    if DROPOUT:
        s *= keep_scale
    if pid == 0:  # every program computed the same S; one writes it for the backward pass
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :], s, mask=m_in[:, None] & r_in[None, :])

    bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                 mask=r_in[:, None] & n_in[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(s * scaling, bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])


_lora_forward_small = Tuned(_lora_forward_small_kernel, CONFIGS["small"], key=["M", "N", "K", "R"])

SMALL_M_MAX = 64  # largest M the single-launch decode kernel is meant for


@triton_op("fastpeft_triton::lora_forward_small", mutates_args=())
def lora_forward_small(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float, p: float,
                       seed: Tensor) -> tuple[Tensor, Tensor]:
    """Decode path (M <= SMALL_M_MAX), one launch: returns (y [M, N] x.dtype, S fp32 [M, r])."""
    x, w, a, b, bias = int32_columns(x), int32_columns(w), int32_columns(a), int32_columns(b), unit_stride(bias)
    M, K = x.shape
    N = w.shape[0]
    R = a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    s_mat = torch.empty((M, R), device=x.device, dtype=torch.float32)
    seed, threshold, keep_scale, dropout = dropout_args(p, seed, x)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_forward_small(x)[grid](x, w, bias if bias is not None else x, a, b, y, s_mat, M, N, K, R,
                                 x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
                                 b.stride(0), b.stride(1), y.stride(0), y.stride(1), s_mat.stride(0),
                                 float(scaling), seed, threshold, keep_scale,
                                 HAS_BIAS=bias is not None, DROPOUT=dropout, R_PAD=_r_pad(R),
                                 PRECISION=precision(x.dtype), UPCAST=interpreting(x),
                                 BLOCK_M=max(16, triton.next_power_of_2(M)))
    return y, s_mat


# ---------------------------------------------------------------------------------------------------------------
# Backward, part 1 (one pass over dy): G = s * dy @ b,  dB = s * dy.T @ S
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _lora_backward_shrink_kernel(
    dy_ptr, b_ptr, s_ptr, g_ptr, db_ptr,  # dy [M, N], b [N, R], S fp32 [M, R]; out G fp32 [M, R], dB fp32 [N, R]
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_gm, stride_dbn,
    scaling,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_in = offs_m < M
    r_in = offs_r < R
    # This block's rows of S, pre-scaled: each N block adds its dB partial (s * dy_blk.T @ S_blk) atomically.
    s = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr,
                mask=m_in[:, None] & r_in[None, :], other=0.0) * scaling
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    g = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_in = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=m_in[:, None] & n_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_in[:, None] & r_in[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        db = tl.dot(tl.trans(dy).to(tl.float32), s, input_precision=PRECISION)
        tl.atomic_add(db_ptr + (n0 + offs_n)[:, None] * stride_dbn + offs_r[None, :], db,
                      mask=n_in[:, None] & r_in[None, :])
        dy_ptrs += BLOCK_N * stride_dyn
        b_ptrs += BLOCK_N * stride_bn
    tl.store(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_r[None, :], g * scaling,
             mask=m_in[:, None] & r_in[None, :])


_lora_backward_shrink = Tuned(_lora_backward_shrink_kernel, CONFIGS["backward_shrink"], key=["M", "N", "R"],
                              reset_to_zero=["db_ptr"])


@triton_op("fastpeft_triton::lora_backward_shrink", mutates_args=())
def lora_backward_shrink(dy: Tensor, b: Tensor, s_mat: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """One pass over dy `[M, N]`: returns (G = s * dy @ b fp32 `[M, r]`, dB = s * dy.T @ S fp32 `[N, r]`).
    dB is summed with fp32 atomics across M blocks (not bit-reproducible run to run)."""
    dy, b = int32_columns(dy), int32_columns(b)
    M, N = dy.shape
    R = b.shape[1]
    g = torch.empty((M, R), device=dy.device, dtype=torch.float32)
    db = torch.zeros((N, R), device=dy.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _lora_backward_shrink(dy)[grid](dy, b, s_mat, g, db, M, N, R, dy.stride(0), dy.stride(1), b.stride(0),
                                    b.stride(1), s_mat.stride(0), s_mat.stride(1), g.stride(0), db.stride(0),
                                    float(scaling), R_PAD=_r_pad(R), PRECISION=precision(dy.dtype),
                                    UPCAST=interpreting(dy))
    return g, db


# ---------------------------------------------------------------------------------------------------------------
# Backward, part 2 (one GEMM over [M, K] tiles): dx = dy @ w + mask/(1-p) * (G @ a),  dA += G.T @ drop(x)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["drop_threshold"])
def _lora_backward_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,  # G fp32 [M, R], a [R, K]; out dx [M, K], dA fp32 [R, K]
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dar,
    seed_ptr, drop_threshold, keep_scale,
    NEED_DX: tl.constexpr,  # False: only dA (x does not require grad); the dy @ w GEMM is compiled away
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    m_in = offs_m < M
    k_in = offs_k < K
    r_in = offs_r < R

    if NEED_DX:  # dy @ w; rows / columns past the edge wrap onto valid ones, so the loop masks only N
        dy_ptrs = dy_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = w_ptr + (offs_k % K)[None, :] * stride_wk + offs_n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_in = offs_n < N - n0
            dy = tl.load(dy_ptrs, mask=n_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_in[:, None], other=0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn

    # The tile's x, its dropout mask (generated once, used for dA and dx) and G rows.
    mk_in = m_in[:, None] & k_in[None, :]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=mk_in, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    if DROPOUT:
        keep = dropout_keep(dropout_row_key(offs_m, tl.load(seed_ptr)), dropout_col_key(offs_k), drop_threshold)
        x = tl.where(keep, x, 0.0)
    g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_r[None, :] * stride_gr,
                mask=m_in[:, None] & r_in[None, :], other=0.0)

    # dA[:, k-block] += G_blk.T @ drop(x)_tile, summed over M blocks with fp32 atomics.
    da = tl.dot(tl.trans(g), x.to(tl.float32), input_precision=PRECISION)
    if DROPOUT:
        da *= keep_scale
    tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :], da, mask=r_in[:, None] & k_in[None, :])

    if NEED_DX:  # dx = dy @ w + mask/(1-p) * (G_blk @ a_blk)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            acc += tl.where(keep, tl.dot(g * keep_scale, a, input_precision=PRECISION), 0.0)
        else:
            acc = tl.dot(g, a, acc, input_precision=PRECISION)
        dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mk_in)


_lora_backward_dx_tuned = Tuned(_lora_backward_dx_kernel, CONFIGS["dx"], key=["M", "N", "K", "R"],
                                reset_to_zero=["da_ptr"])


def lora_backward_dx(dy, w, g, a, x, p: float, seed, need_dx: bool = True):
    """Returns (dx `[M, K]` x.dtype or None, dA fp32 `[r, K]`) for dy `[M, N]`, w `[N, K]`, G fp32 `[M, r]`,
    a `[r, K]`, x `[M, K]`. dA is summed with fp32 atomics across M blocks."""
    dx, da = _lora_backward_dx(dy, w, g, a, x, p, seed, need_dx)
    return (dx if need_dx else None), da


@triton_op("fastpeft_triton::lora_backward_dx", mutates_args=())
def _lora_backward_dx(dy: Tensor, w: Tensor, g: Tensor, a: Tensor, x: Tensor, p: float, seed: Tensor,
                      need_dx: bool) -> tuple[Tensor, Tensor]:
    """`lora_backward_dx` as an op, whose outputs are tensors: dx is empty when not `need_dx`."""
    dy, w, a, x = int32_columns(dy), int32_columns(w), int32_columns(a), int32_columns(x)
    M, K = x.shape
    N = dy.shape[1]
    R = a.shape[0]
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_dx else x.new_empty(0)
    da = torch.zeros((R, K), device=x.device, dtype=torch.float32)
    seed, threshold, keep_scale, dropout = dropout_args(p, seed, x)
    dx_arg = dx if need_dx else x  # never written when NEED_DX is False
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _lora_backward_dx_tuned(x)[grid](dy, w, g, a, x, dx_arg, da, M, N, K, R,
                                     dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), g.stride(0), g.stride(1),
                                     a.stride(0), a.stride(1), x.stride(0), x.stride(1), dx_arg.stride(0),
                                     dx_arg.stride(1), da.stride(0), seed, threshold, keep_scale,
                                     NEED_DX=need_dx, DROPOUT=dropout, R_PAD=_r_pad(R), PRECISION=precision(x.dtype),
                                     UPCAST=interpreting(x))
    return dx, da


# ---------------------------------------------------------------------------------------------------------------
# Launches that reach every compiled variant (kernels/aot.py builds them for sm_90 / sm_80 in tests/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------------------
# Kernels whose main loop is a tensor-core GEMM, with the constexpr that the loop needs ("" for none): their bf16 /
# fp16 sm_90 builds must issue wgmma inside it (the shrink kernels' BLOCK_M >= 64 is one warpgroup's M).
WGMMA_LOOPS = {"_lora_shrink_kernel": "", "_lora_forward_kernel": "", "_lora_backward_shrink_kernel": "",
               "_lora_backward_dx_kernel": "NEED_DX"}
AOT_DIMENSIONS = {  # worst case first
    "dtype": (torch.bfloat16, torch.float16, torch.float32),
    "rank": (64, 32, 16, 8),  # each padded rank; 8 (the common LoRA rank) pads to 16 and is no multiple of 16
    "dropout": (0.1, 0.0),
    "bias": (True, False),
    "decode_rows": (64, 32, 1),  # the decode kernel's BLOCK_M 64 / 32 / 16; one row makes M the constant 1
    "need_dx": (True, False),
}


def aot_launch(dtype, rank, dropout, bias, decode_rows, need_dx):
    """Every launcher once, on contiguous 16-aligned operands as a training step hands them over."""
    m, n, k = 256, 256, 256
    x, dy, w = (torch.empty(size, dtype=dtype) for size in ((m, k), (m, n), (n, k)))
    a, b, bias_t = torch.empty(rank, k, dtype=dtype), torch.empty(n, rank, dtype=dtype), torch.empty(n, dtype=dtype)
    bias_t = bias_t if bias else None
    s_mat, seed = torch.empty(m, rank), torch.zeros((), dtype=torch.int64)
    lora_shrink(x, a, dropout, seed)
    lora_forward(x, w, bias_t, s_mat, b, 2.0)
    lora_forward_small(x[:decode_rows], w, bias_t, a, b, 2.0, dropout, seed)
    lora_backward_shrink(dy, b, s_mat, 2.0)
    lora_backward_dx(dy, w, s_mat, a, x, dropout, seed, need_dx)
