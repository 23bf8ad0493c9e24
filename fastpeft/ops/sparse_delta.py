"""Sparse weight delta (diff pruning's fixed-mask stage): y = x (W0 + delta)^T + bias, delta sparse.

The delta lives as `values` at `indices`: flat positions in the *stored* weight (row-major, so `row * cols + col`
of `weight.shape == (rows, cols)`; for a GPT-2 Conv1D, `fan_in_fan_out=True`, the stored weight is [in, out]),
strictly increasing (sorted row-major COO: the nonzeros of one row are contiguous), int32 where the weight has
fewer than 2**31 entries, else int64.

The fast path keeps W0 + delta *in* the weight (rounded once from fp32 at the masked positions, by
`scatter_delta_`), so forward and dx are the plain base GEMMs, and the only extra work is the values' gradient:
a sampled dense-dense product (SDDMM), `nnz` dot products over the rows of dy and x instead of the full dW.
Backends of the SDDMM and the scatter: `ext` (csrc/sparse_delta.cpp, CPU), `triton` (kernels/sparse_delta.py,
CUDA), `torch` (a chunked gather-dot on CPU at low density, else the reference's dense product).
Reference first (the oracle of every test), then the backends, then the public entry points
`sparse_delta_linear`, `sddmm` and `scatter_delta_`. The per-step entry points check shapes, dtypes and devices,
not the index data (`check_indices` does, where masks are made or loaded; the extension also refuses bad ones).
"""
import torch
import torch.nn.functional as F
from torch.autograd.graph import increment_version

from fastpeft import backends
from fastpeft.ops import autocast, checks

INDEX_DTYPES = (torch.int32, torch.int64)


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat position fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs; float64 stays float64 (the tests' exact oracle)."""
    return torch.promote_types(dtype, torch.float32)


def sparse_delta_linear_ref(x, weight0, bias, values, indices, fan_in_fan_out=False):
    """x (W0 + delta)^T + bias from the *unmerged* weight W0, in fp32, rounded once to x's dtype; autograd gives
    the values' gradient as the dense dW gathered at `indices`."""
    acc = _accumulation(x.dtype)
    merged = weight0.to(acc).flatten().index_add(0, indices.long(), values.to(acc)).view(weight0.shape)
    w = merged.t() if fan_in_fan_out else merged
    out = F.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return out.to(x.dtype)


def sddmm_ref(a, b, indices):
    """(a^T b).flatten()[indices] in fp32: the dense product, then a gather. a [M, rows], b [M, cols]."""
    acc = _accumulation(a.dtype)
    return (a.to(acc).t() @ b.to(acc)).flatten()[indices.long()]


def scatter_delta_ref(weight, base_values, values, indices):
    """weight.flatten()[indices] = round(base_values + values), the sum in fp32, in place (positions are row-major
    in the weight's shape, whatever its strides)."""
    rows, cols = _divmod(indices, weight.shape[1])
    weight[rows, cols] = (base_values.float() + values.float()).to(weight.dtype)
    return weight


def _divmod(indices, cols: int):
    """(row, column) of flat row-major positions in a matrix of `cols` columns, as int64."""
    flat = indices.long()
    return flat.div(max(cols, 1), rounding_mode="floor"), flat.remainder(max(cols, 1))


# ---------------------------------------------------------------------------------------------------- backends
# The torch backend's SDDMM on CPU: a chunked gather-dot beats the dense product and a gather below this density
# (nnz / (rows * cols)); see _sddmm_gather. On CUDA it keeps the dense product: cuBLAS runs the [rows, M] x [M, cols]
# GEMM at tensor-core speed, while the gathers move 3 * 4 * M * nnz bytes through memory, more time than the GEMM
# takes above a density of about 1e-3 (bf16 at ~3 TB/s and ~600 TFLOP/s).
GATHER_MAX_DENSITY = 0.01
GATHER_CHUNK = 1 << 19  # elements of one gathered [rows of M, nnz] chunk (2 MiB fp32: stays in L2 / L3)


def _sddmm_gather(a, b, indices):
    """The SDDMM in plain torch ops without the dense product: for a chunk of rows of a and b, the columns that
    the nonzeros use are gathered side by side ([chunk, nnz] each), multiplied and summed over the chunk."""
    a_cols, b_cols = _divmod(indices, b.shape[1])
    out = torch.zeros(indices.numel(), dtype=torch.float32, device=a.device)
    step = max(1, GATHER_CHUNK // max(indices.numel(), 1))
    for m0 in range(0, a.shape[0], step):
        products = a[m0:m0 + step].index_select(1, a_cols).float()
        out += products.mul_(b[m0:m0 + step].index_select(1, b_cols).float()).sum(0)
    return out


def _gather_pays(a, b, indices) -> bool:
    return a.device.type == "cpu" and indices.numel() < GATHER_MAX_DENSITY * a.shape[1] * b.shape[1]


def _sddmm(a, b, indices, name):
    if name == "ext":
        return backends.ext_ops().sddmm(a, b, indices)
    if name == "triton":
        from fastpeft.kernels import sparse_delta as kernels

        return kernels.sddmm(a, b, indices)
    if name == "torch" and _gather_pays(a, b, indices):
        return _sddmm_gather(a, b, indices)
    return sddmm_ref(a, b, indices)


def _scatter(weight, base_values, values, indices, name):
    """The torch backend is the reference: one index_put is what PyTorch has for this."""
    if name == "ext":
        backends.ext_ops().scatter_delta_(weight, base_values, values, indices)
    elif name == "triton":
        from fastpeft.kernels import sparse_delta as kernels

        kernels.scatter_delta_(weight, base_values, values, indices)
    else:
        scatter_delta_ref(weight, base_values, values, indices)


class SparseDeltaLinearFn(torch.autograd.Function):
    """Forward: the base linear on the weight that already holds W0 + delta. Backward: dx = dy W (the base
    GEMM), d values = SDDMM of dy and x at the mask; nothing is saved beyond x and the weight."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, values, indices, fan_in_fan_out, name):
        w = weight.t() if fan_in_fan_out else weight
        out = F.linear(x2d, w, bias)
        ctx.save_for_backward(x2d, weight, indices)
        ctx.config = (fan_in_fan_out, name, bias is not None, values.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, indices = ctx.saved_tensors
        fan_in_fan_out, name, has_bias, values_dtype = ctx.config
        need_dx, need_dw, need_dbias, need_dvalues = ctx.needs_input_grad[:4]
        w = weight.t() if fan_in_fan_out else weight
        dx = dy.mm(w) if need_dx else None
        a, b = (x2d, dy) if fan_in_fan_out else (dy, x2d)  # the stored weight's gradient is a^T b
        dw = a.t().mm(b) if need_dw else None
        dbias = dy.sum(0) if need_dbias and has_bias else None
        dvalues = _sddmm(a, b, indices, name).to(values_dtype) if need_dvalues else None
        return dx, dw, dbias, dvalues, None, None, None


# ------------------------------------------------------------------------------------------------- validation
def _check_delta(weight, values, indices, base_values=None):
    checks.check_tensor("weight", weight, dim=2)
    checks.check_tensor("values", values, dim=1)
    check_index_tensor(indices, weight.device, "weight")
    if indices.shape != values.shape:
        raise ValueError(f"indices and values must have one length, got shapes {tuple(indices.shape)} and "
                         f"{tuple(values.shape)}")
    if base_values is not None:
        checks.check_tensor("base_values", base_values, shape=tuple(values.shape))
        checks.check_same("weight", weight, base_values=base_values)
    if values.device != weight.device:
        raise ValueError(f"values is on {values.device} but weight is on {weight.device}")


def check_index_tensor(indices, device: torch.device, owner: str) -> None:
    """A 1-D int32 / int64 tensor on `owner`'s device (its contents are check_indices' business)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"indices is on {indices.device} but {owner} is on {device}")


def check_indices(indices: torch.Tensor, numel: int) -> None:
    """Sorted, duplicate-free flat positions inside a weight of `numel` entries (checked on the data: loads and
    public constructors call it, the per-step entry points do not)."""
    if indices.numel() == 0:
        return
    low, high = indices.min().item(), indices.max().item()
    if low < 0 or high >= numel:
        raise ValueError(f"indices must lie in [0, {numel}) (the weight's flat positions), got [{low}, {high}]")
    unsorted = (indices[1:] <= indices[:-1]).nonzero()
    if unsorted.numel():
        at = unsorted[0, 0].item()
        raise ValueError(f"indices must be strictly increasing (sorted row-major, no duplicates), got "
                         f"{indices[at].item()} then {indices[at + 1].item()} at positions {at}, {at + 1}")


# ------------------------------------------------------------------------------------------------ entry points
def sparse_delta_linear(x, weight, bias, values, indices, fan_in_fan_out=False, backend=None):
    """x @ W^T + bias for x [..., in], where `weight` already holds W0 + delta at `indices` (see
    `scatter_delta_`); gradients flow to x, `values` (the delta at the mask) and bias / weight if they need them.
    `weight` is [out, in], or [in, out] with `fan_in_fan_out` (GPT-2 Conv1D). `backend` overrides
    FASTPEFT_BACKEND for this call (see fastpeft.backends). Under torch.autocast the linear runs in autocast's dtype,
    as nn.Linear's (fastpeft.ops.autocast); `values` keeps its dtype, and its gradient is accumulated in fp32."""
    x, weight, bias = autocast.cast(x, weight, bias)
    checks.check_tensor("x", x)
    _check_delta(weight, values, indices)
    in_features, out_features = weight.shape[::-1] if not fan_in_fan_out else weight.shape
    if in_features < 1:
        raise ValueError(f"the weight must have in_features >= 1, got weight of shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal the weight's in_features {in_features}, got x of shape "
                         f"{tuple(x.shape)}")
    if bias is not None:
        checks.check_tensor("bias", bias, shape=(out_features,))
    checks.check_same("x", x, weight=weight, bias=bias)
    name = backends.choose(x.device, backend, dtype=x.dtype)
    x2d = x.reshape(-1, in_features)
    out = SparseDeltaLinearFn.apply(x2d, weight, bias, values, indices, fan_in_fan_out, name)
    return out.reshape(*x.shape[:-1], out_features)


def sddmm(a, b, indices, backend=None):
    """(a^T b).flatten()[indices] in fp32 without the dense product: a [M, rows], b [M, cols] of one dtype,
    indices sorted flat positions in [rows, cols]."""
    checks.check_tensor("a", a, dim=2)
    checks.check_tensor("b", b, dim=2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows, got {tuple(a.shape)} and {tuple(b.shape)}")
    checks.check_same("a", a, b=b)
    check_index_tensor(indices, a.device, "a")
    return _sddmm(a, b, indices, backends.choose(a.device, backend, dtype=a.dtype))


@torch.no_grad()
def scatter_delta_(weight, base_values, values, indices, backend=None):
    """weight.flatten()[indices] = base_values + values (summed in fp32, rounded once to weight's dtype), in place;
    returns weight. `base_values` are W0's entries at `indices`, so the result never depends on what the weight
    held there before."""
    _check_delta(weight, values, indices, base_values)
    version = weight._version
    _scatter(weight, base_values, values, indices, backends.choose(weight.device, backend, dtype=weight.dtype))
    if weight._version == version:  # the kernels write through pointers: tell autograd, as index_put_ does
        increment_version(weight)
    return weight
