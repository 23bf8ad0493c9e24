"""Fused bottleneck-adapter kernels (Triton) and their launchers.

Forward   z = drop(h) @ Wd.T + bd   (fp32, [rows, m], stored for backward: 4 m bytes a row, never [rows, d])
          y = r + s * (act(z) @ Wu.T + bu)                            ONE launch per block of rows: the [BM, m]
          bottleneck stays in registers between the down-projection loop (over d) and the up-projection loop
          (over d again, writing one output tile per step). r is h itself unless a residual is given.
Backward  kernel 1 (one pass over dy per row block): G = dy @ Wu; dWu += s dy.T act(z); dbu += s sum dy;
          dz = s G * act'(z) (fp32 [rows, m]); dbd += sum dz.
          kernel 2 (one pass over h, and dy when r is h): dh = [dy] + mask/(1-p) * (dz @ Wd);
          dWd += dz.T drop(h) / (1-p).
So the backward reads dy twice (once when a residual is given), h once, writes dh once; the pre-activation is
stored rather than recomputed, since re-reading h (2-4 d bytes a row) costs more than 4 m bytes a row.
Weight gradients are summed over row blocks with fp32 atomics (not bit-reproducible run to run on a GPU).

Numerics: every dot accumulates in fp32; fp32 inputs use exact fp32 dots. For bf16 / fp16 the bottleneck
(act(z) forward, dz backward) is rounded once to the input dtype before it meets a weight, as PyTorch rounds it
too, so every dot runs on bf16 / fp16 tensor cores. The activation, bias, scaling and residual add are fp32, and
the output rounds once. Widths m = 1..256 are padded to a power of two >= 16 (tl.dot's minimum) and masked.
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

ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2}
MAX_WIDTH = 256

# One config per kernel and input family, so the AOT build stays short. Each fits sm_80's 163 KB of shared memory
# and spills no registers at the worst case m = 256 (the AOT test checks its launch-specialised builds): the
# [BLOCK_D, 256] weight tiles dominate shared memory, so BLOCK_D is 64 (bf16 / fp16) or 32 (fp32) forward, and 32
# backward, whose loops also stream dy (at 64 the backward-down kernel's pipelined copies asked for 240 KB on
# sm_90, and both backward kernels spilled; backward-up still spilled on sm_80 pipelined 3 deep). BLOCK_M = 64 is
# one Hopper warpgroup's wgmma M; 8 warps hold the [BLOCK_M, m] fp32 bottleneck (4 would spill at m = 256); the
# fp32 backward, whose exact dots keep both operands in registers, takes 32 rows.
CONFIGS = {
    "forward": {"lowp": [config(8, 3, BLOCK_M=64, BLOCK_D=64)], "fp32": [config(8, 2, BLOCK_M=64, BLOCK_D=32)]},
    "backward_up": {"lowp": [config(8, 2, BLOCK_M=64, BLOCK_D=32)], "fp32": [config(8, 2, BLOCK_M=32, BLOCK_D=32)]},
    "backward_down": {"lowp": [config(8, 3, BLOCK_M=64, BLOCK_D=32)], "fp32": [config(8, 2, BLOCK_M=32, BLOCK_D=32)]},
}


def _width_pad(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """relu / exact (erf) gelu / silu of fp32 z; act(0) = 0, so padded columns stay zero."""
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0)
    elif ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _activate_grad(z, ACTIVATION: tl.constexpr):
    """d act / dz at fp32 z."""
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:  # Phi(z) + z phi(z)
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))


# ---------------------------------------------------------------------------------------------------------------
# Forward: y = r + s * (act(drop(h) @ Wd.T + bd) @ Wu.T + bu), and the fp32 pre-activation z
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["drop_threshold"])
def _adapter_forward_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, r_ptr, y_ptr, z_ptr,  # h, r, y [M, D]; wd [W, D]; wu [D, W]; z fp32 [M, W]
    M, D, W,
    stride_hm, stride_hd, stride_wdw, stride_wdd, stride_wud, stride_wuw, stride_rm, stride_rd, stride_ym, stride_yd,
    stride_zm,
    scaling, seed_ptr, drop_threshold, keep_scale,  # int64 dropout key (one element), uint32 threshold, 1/(1-p)
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, DROPOUT: tl.constexpr, ACTIVATION: tl.constexpr,
    W_PAD: tl.constexpr,  # bottleneck width padded to a power of two >= 16
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, W_PAD)
    m_in = offs_m < M
    w_in = offs_w < W
    rows = offs_m[:, None].to(tl.int64)

    # Down-projection, looping over d.
    h_ptrs = h_ptr + rows * stride_hm + offs_d[None, :] * stride_hd
    wd_ptrs = wd_ptr + offs_w[None, :] * stride_wdw + offs_d[:, None] * stride_wdd  # Wd.T tile [BLOCK_D, W_PAD]
    if DROPOUT:
        row_key = dropout_row_key(offs_m, tl.load(seed_ptr))
    z = tl.zeros((BLOCK_M, W_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_in = offs_d < D - d0
        h = tl.load(h_ptrs, mask=m_in[:, None] & d_in[None, :], other=0.0)
        wd = tl.load(wd_ptrs, mask=d_in[:, None] & w_in[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            wd = wd.to(tl.float32)
        if DROPOUT:
            h = tl.where(dropout_keep(row_key, dropout_col_key(d0 + offs_d), drop_threshold), h, 0.0)
        z = tl.dot(h, wd, z, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        wd_ptrs += BLOCK_D * stride_wdd
    if DROPOUT:
        z *= keep_scale
    if HAS_BD:
        z += tl.load(bd_ptr + offs_w, mask=w_in, other=0.0).to(tl.float32)[None, :]
    tl.store(z_ptr + rows * stride_zm + offs_w[None, :], z, mask=m_in[:, None] & w_in[None, :])
    a = _activate(z, ACTIVATION).to(wu_ptr.dtype.element_ty)  # rounded once to the input dtype
    if UPCAST:
        a = a.to(tl.float32)

    # Up-projection, bias, scaling and residual, one [BLOCK_M, BLOCK_D] output tile per step over d.
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + offs_d
        d_in = offs < D
        wu = tl.load(wu_ptr + offs[None, :] * stride_wud + offs_w[:, None] * stride_wuw,
                     mask=w_in[:, None] & d_in[None, :], other=0.0)  # Wu.T tile [W_PAD, BLOCK_D]
        if UPCAST:
            wu = wu.to(tl.float32)
        up = tl.dot(a, wu, input_precision=PRECISION)
        if HAS_BU:
            up += tl.load(bu_ptr + offs, mask=d_in, other=0.0).to(tl.float32)[None, :]
        md_in = m_in[:, None] & d_in[None, :]
        r = tl.load(r_ptr + rows * stride_rm + offs[None, :] * stride_rd, mask=md_in, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows * stride_ym + offs[None, :] * stride_yd, (r + scaling * up).to(y_ptr.dtype.element_ty),
                 mask=md_in)


_adapter_forward = Tuned(_adapter_forward_kernel, CONFIGS["forward"], key=["M", "D", "W"])


@triton_op("fastpeft_triton::adapter_forward", mutates_args=())
def adapter_forward(h: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                    residual: Tensor | None, activation: str, scaling: float, p: float,
                    seed: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (y `[M, d]` h.dtype, z fp32 `[M, m]`) for h `[M, d]`; `residual` None means h."""
    h, w_down, w_up = int32_columns(h), int32_columns(w_down), int32_columns(w_up)
    b_down, b_up = unit_stride(b_down), unit_stride(b_up)
    M, D = h.shape
    W = w_down.shape[0]
    r = h if residual is None else int32_columns(residual)
    y = torch.empty((M, D), device=h.device, dtype=h.dtype)
    z = torch.empty((M, W), device=h.device, dtype=torch.float32)
    seed, threshold, keep_scale, dropout = dropout_args(p, seed, h)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _adapter_forward(h)[grid](
        h, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, r, y, z,
        M, D, W, h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        r.stride(0), r.stride(1), y.stride(0), y.stride(1), z.stride(0), float(scaling), seed, threshold, keep_scale,
        HAS_BD=b_down is not None, HAS_BU=b_up is not None, DROPOUT=dropout, ACTIVATION=ACTIVATION_IDS[activation],
        W_PAD=_width_pad(W), PRECISION=precision(h.dtype), UPCAST=interpreting(h))
    return y, z


# ---------------------------------------------------------------------------------------------------------------
# Backward, kernel 1 (one pass over dy): dz = s (dy @ Wu) * act'(z); dWu += s dy.T act(z); dbu += s sum dy;
# dbd += sum dz
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _adapter_backward_up_kernel(
    dy_ptr, wu_ptr, z_ptr, dz_ptr, dwu_ptr, dbu_ptr, dbd_ptr,  # z, dz fp32 [M, W]; dwu fp32 [D, W]; dbu fp32 [D]
    M, D, W,
    stride_dym, stride_dyd, stride_wud, stride_wuw, stride_zm, stride_dzm,
    scaling,
    ACTIVATION: tl.constexpr, W_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, W_PAD)
    m_in = offs_m < M
    w_in = offs_w < W
    rows = offs_m[:, None].to(tl.int64)
    mw_in = m_in[:, None] & w_in[None, :]
    z_ptrs = z_ptr + rows * stride_zm + offs_w[None, :]
    a = _activate(tl.load(z_ptrs, mask=mw_in, other=0.0), ACTIVATION).to(wu_ptr.dtype.element_ty)  # forward's act(z)
    if UPCAST:
        a = a.to(tl.float32)

    dy_ptrs = dy_ptr + rows * stride_dym + offs_d[None, :] * stride_dyd
    wu_ptrs = wu_ptr + offs_d[:, None] * stride_wud + offs_w[None, :] * stride_wuw  # Wu tile [BLOCK_D, W_PAD]
    g = tl.zeros((BLOCK_M, W_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_in = offs_d < D - d0
        dy = tl.load(dy_ptrs, mask=m_in[:, None] & d_in[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=d_in[:, None] & w_in[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            wu = wu.to(tl.float32)
        g = tl.dot(dy, wu, g, input_precision=PRECISION)
        dwu = tl.dot(tl.trans(dy), a, input_precision=PRECISION)  # this row block's share of dy.T act(z)
        tl.atomic_add(dwu_ptr + (d0 + offs_d)[:, None] * W + offs_w[None, :], dwu * scaling,
                      mask=d_in[:, None] & w_in[None, :])
        tl.atomic_add(dbu_ptr + d0 + offs_d, tl.sum(dy.to(tl.float32), axis=0) * scaling, mask=d_in)
        dy_ptrs += BLOCK_D * stride_dyd
        wu_ptrs += BLOCK_D * stride_wud
    # z is read again rather than kept live across the loop: at m = 256 holding it spilled registers (AOT test).
    dz = g * scaling * _activate_grad(tl.load(z_ptrs, mask=mw_in, other=0.0), ACTIVATION)
    tl.store(dz_ptr + rows * stride_dzm + offs_w[None, :], dz, mask=mw_in)
    tl.atomic_add(dbd_ptr + offs_w, tl.sum(dz, axis=0), mask=w_in)


_adapter_backward_up = Tuned(_adapter_backward_up_kernel, CONFIGS["backward_up"], key=["M", "D", "W"],
                             reset_to_zero=["dwu_ptr", "dbu_ptr", "dbd_ptr"])


@triton_op("fastpeft_triton::adapter_backward_up", mutates_args=())
def adapter_backward_up(dy: Tensor, w_up: Tensor, z: Tensor, activation: str,
                        scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass over dy `[M, d]`: returns fp32 (dz `[M, m]`, dW_up `[d, m]`, db_up `[d]`, db_down `[m]`)."""
    dy, w_up = int32_columns(dy), int32_columns(w_up)
    M, D = dy.shape
    W = w_up.shape[1]
    dz = torch.empty((M, W), device=dy.device, dtype=torch.float32)
    dwu = torch.zeros((D, W), device=dy.device, dtype=torch.float32)
    dbu = torch.zeros(D, device=dy.device, dtype=torch.float32)
    dbd = torch.zeros(W, device=dy.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _adapter_backward_up(dy)[grid](
        dy, w_up, z, dz, dwu, dbu, dbd, M, D, W, dy.stride(0), dy.stride(1), w_up.stride(0), w_up.stride(1),
        z.stride(0), dz.stride(0), float(scaling), ACTIVATION=ACTIVATION_IDS[activation], W_PAD=_width_pad(W),
        PRECISION=precision(dy.dtype), UPCAST=interpreting(dy))
    return dz, dwu, dbu, dbd


# ---------------------------------------------------------------------------------------------------------------
# Backward, kernel 2 (one pass over h): dh = [dy] + mask/(1-p) * (dz @ Wd); dWd += dz.T drop(h)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["drop_threshold"])
def _adapter_backward_down_kernel(
    dy_ptr, dz_ptr, wd_ptr, h_ptr, dh_ptr, dwd_ptr,  # dz fp32 [M, W]; wd [W, D]; dh [M, D]; dwd fp32 [W, D]
    M, D, W,
    stride_dym, stride_dyd, stride_dzm, stride_wdw, stride_wdd, stride_hm, stride_hd, stride_dhm, stride_dhd,
    seed_ptr, drop_threshold, keep_scale,
    NEED_DH: tl.constexpr,  # False: only dWd (h does not require grad); the dz @ Wd dot is compiled away
    ADD_DY: tl.constexpr,  # the residual is h itself, so dh also carries dy
    DROPOUT: tl.constexpr, W_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, W_PAD)
    m_in = offs_m < M
    w_in = offs_w < W
    rows = offs_m[:, None].to(tl.int64)
    dz = tl.load(dz_ptr + rows * stride_dzm + offs_w[None, :], mask=m_in[:, None] & w_in[None, :], other=0.0)
    dz = dz.to(wd_ptr.dtype.element_ty)  # rounded once to the input dtype, as PyTorch rounds its d_pre
    if UPCAST:
        dz = dz.to(tl.float32)
    if DROPOUT:
        row_key = dropout_row_key(offs_m, tl.load(seed_ptr))

    for d0 in range(0, D, BLOCK_D):
        offs = d0 + offs_d
        d_in = offs < D
        md_in = m_in[:, None] & d_in[None, :]
        h = tl.load(h_ptr + rows * stride_hm + offs[None, :] * stride_hd, mask=md_in, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(row_key, dropout_col_key(offs), drop_threshold)  # one mask for dWd and dh
            h = tl.where(keep, h, 0.0)
        dwd = tl.dot(tl.trans(dz), h, input_precision=PRECISION)
        if DROPOUT:
            dwd *= keep_scale
        tl.atomic_add(dwd_ptr + offs_w[:, None] * D + offs[None, :], dwd, mask=w_in[:, None] & d_in[None, :])
        if NEED_DH:
            wd = tl.load(wd_ptr + offs_w[:, None] * stride_wdw + offs[None, :] * stride_wdd,
                         mask=w_in[:, None] & d_in[None, :], other=0.0)  # Wd tile [W_PAD, BLOCK_D]
            if UPCAST:
                wd = wd.to(tl.float32)
            dh = tl.dot(dz, wd, input_precision=PRECISION)
            if DROPOUT:
                dh = tl.where(keep, dh * keep_scale, 0.0)
            if ADD_DY:
                dh += tl.load(dy_ptr + rows * stride_dym + offs[None, :] * stride_dyd, mask=md_in,
                              other=0.0).to(tl.float32)
            tl.store(dh_ptr + rows * stride_dhm + offs[None, :] * stride_dhd, dh.to(dh_ptr.dtype.element_ty),
                     mask=md_in)


_adapter_backward_down_tuned = Tuned(_adapter_backward_down_kernel, CONFIGS["backward_down"], key=["M", "D", "W"],
                                     reset_to_zero=["dwd_ptr"])


def adapter_backward_down(dy, dz, w_down, h, p: float, seed, need_dh: bool, add_dy: bool):
    """One pass over h `[M, d]`: returns (dh `[M, d]` h.dtype or None, dW_down fp32 `[m, d]`)."""
    dh, dwd = _adapter_backward_down(dy, dz, w_down, h, p, seed, need_dh, add_dy)
    return (dh if need_dh else None), dwd


@triton_op("fastpeft_triton::adapter_backward_down", mutates_args=())
def _adapter_backward_down(dy: Tensor, dz: Tensor, w_down: Tensor, h: Tensor, p: float, seed: Tensor, need_dh: bool,
                           add_dy: bool) -> tuple[Tensor, Tensor]:
    """`adapter_backward_down` as an op, whose outputs are tensors: dh is empty when not `need_dh`."""
    dy, w_down, h = int32_columns(dy), int32_columns(w_down), int32_columns(h)
    M, D = h.shape
    W = w_down.shape[0]
    dh = torch.empty((M, D), device=h.device, dtype=h.dtype) if need_dh else h.new_empty(0)
    dwd = torch.zeros((W, D), device=h.device, dtype=torch.float32)
    seed, threshold, keep_scale, dropout = dropout_args(p, seed, h)
    dh_arg = dh if need_dh else h  # never written when NEED_DH is False
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _adapter_backward_down_tuned(h)[grid](
        dy, dz, w_down, h, dh_arg, dwd, M, D, W, dy.stride(0), dy.stride(1), dz.stride(0), w_down.stride(0),
        w_down.stride(1), h.stride(0), h.stride(1), dh_arg.stride(0), dh_arg.stride(1), seed, threshold, keep_scale,
        NEED_DH=need_dh, ADD_DY=need_dh and add_dy, DROPOUT=dropout, W_PAD=_width_pad(W),
        PRECISION=precision(h.dtype), UPCAST=interpreting(h))
    return dh, dwd


# ---------------------------------------------------------------------------------------------------------------
# Launches that reach every compiled variant (kernels/aot.py builds them for sm_90 / sm_80 in tests/test_triton_aot.py)
# ---------------------------------------------------------------------------------------------------------------
# Kernels whose loops are tensor-core GEMMs over d, with the constexpr that the loop needs ("" for none): their bf16 /
# fp16 sm_90 builds must issue wgmma inside a loop. Without dh the backward-down loop's one dot has m rows, fewer
# than a warpgroup's 64 for narrow bottlenecks.
WGMMA_LOOPS = {"_adapter_forward_kernel": "", "_adapter_backward_up_kernel": "",
               "_adapter_backward_down_kernel": "NEED_DH"}
AOT_DIMENSIONS = {  # worst case first
    "dtype": (torch.bfloat16, torch.float16, torch.float32),
    "width": (256, 128, 64, 48, 32, 16),  # each padded width; 48 pads to 64 and is no multiple of 16
    "activation": ("gelu", "silu", "relu"),
    "dropout": (0.1, 0.0),
    "biases": ((True, True), (True, False), (False, True), (False, False)),  # (b_down, b_up)
    "input_grads": ("dh", "dh_and_residual", "none"),  # dh with the residual's dy (residual is h), or no dh
}


def aot_launch(dtype, width, activation, dropout, biases, input_grads):
    """Every launcher once, on contiguous 16-aligned operands as a training step hands them over."""
    rows, d = 256, 256
    h, dy = torch.empty(rows, d, dtype=dtype), torch.empty(rows, d, dtype=dtype)
    w_down, w_up = torch.empty(width, d, dtype=dtype), torch.empty(d, width, dtype=dtype)
    b_down, b_up = (torch.empty(size, dtype=dtype) if on else None for size, on in zip((width, d), biases))
    z, seed = torch.empty(rows, width), torch.zeros((), dtype=torch.int64)
    adapter_forward(h, w_down, b_down, w_up, b_up, None, activation, 2.0, dropout, seed)
    adapter_backward_up(dy, w_up, z, activation, 2.0)
    adapter_backward_down(dy, z, w_down, h, dropout, seed, input_grads != "none", input_grads == "dh_and_residual")
