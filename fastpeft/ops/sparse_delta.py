"""Sparse weight delta (diff pruning's fixed-mask stage): y = x (W0 + delta)^T + bias, delta sparse.

The delta lives as `values` at `indices`: flat positions in the *stored* weight (row-major, so `row * cols + col`
of `weight.shape == (rows, cols)`; for a GPT-2 Conv1D, `fan_in_fan_out=True`, the stored weight is [in, out]),
strictly increasing (sorted row-major COO: the nonzeros of one row are contiguous), int32 where the weight has
fewer than 2**31 entries, else int64.

The fast path keeps W0 + delta *in* the weight (rounded once from fp32 at the masked positions, by
`scatter_delta_`), so forward and dx are the plain base GEMMs, and the only extra work is the values' gradient:
a sampled dense-dense product (SDDMM), `nnz` dot products over the rows of dy and x instead of the full dW.
Reference first (the oracle of every test), then the backends, then the public entry points
`sparse_delta_linear`, `sddmm` and `scatter_delta_`.
"""
import torch
import torch.nn.functional as F

from fastpeft import backends
from fastpeft.ops import checks

INDEX_DTYPES = (torch.int32, torch.int64)


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat position fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def sparse_delta_linear_ref(x, weight0, bias, values, indices, fan_in_fan_out=False):
    """x (W0 + delta)^T + bias from the *unmerged* weight W0, in fp32, rounded once to x's dtype; autograd gives
    the values' gradient as the dense dW gathered at `indices`."""
    merged = weight0.float().flatten().index_add(0, indices.long(), values.float()).view(weight0.shape)
    w = merged.t() if fan_in_fan_out else merged
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def sddmm_ref(a, b, indices):
    """(a^T b).flatten()[indices] in fp32: the dense product, then a gather. a [M, rows], b [M, cols]."""
    return (a.float().t() @ b.float()).flatten()[indices.long()]


def scatter_delta_ref(weight, base_values, values, indices):
    """weight.flatten()[indices] = round(base_values + values), the sum in fp32, in place."""
    weight.view(-1)[indices.long()] = (base_values.float() + values.float()).to(weight.dtype)
    return weight


# ---------------------------------------------------------------------------------------------------- backends
def _sddmm(a, b, indices, name):
    return sddmm_ref(a, b, indices)  # TODO(ops helper): torch / ext / triton SDDMM


def _scatter(weight, base_values, values, indices, name):
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
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape != values.shape:
        raise ValueError(f"indices and values must be 1-D of one length, got shapes {tuple(indices.shape)} and "
                         f"{tuple(values.shape)}")
    if base_values is not None:
        checks.check_tensor("base_values", base_values, shape=tuple(values.shape))
        checks.check_same("weight", weight, base_values=base_values)
    for name, t in (("values", values), ("indices", indices)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")


def check_indices(indices: torch.Tensor, numel: int) -> None:
    """Sorted, duplicate-free flat positions inside a weight of `numel` entries (checked on the data: loads and
    public constructors call it, the per-step entry points do not)."""
    if indices.numel() == 0:
        return
    low, high = indices.min().item(), indices.max().item()
    if low < 0 or high >= numel:
        raise ValueError(f"indices must lie in [0, {numel}) (the weight's flat positions), got [{low}, {high}]")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError("indices must be strictly increasing (sorted row-major, no duplicates)")


# ------------------------------------------------------------------------------------------------ entry points
def sparse_delta_linear(x, weight, bias, values, indices, fan_in_fan_out=False, backend=None):
    """x @ W^T + bias for x [..., in], where `weight` already holds W0 + delta at `indices` (see
    `scatter_delta_`); gradients flow to x, `values` (the delta at the mask) and bias / weight if they need them.
    `weight` is [out, in], or [in, out] with `fan_in_fan_out` (GPT-2 Conv1D). `backend` overrides
    FASTPEFT_BACKEND for this call (see fastpeft.backends)."""
    checks.check_tensor("x", x)
    _check_delta(weight, values, indices)
    in_features, out_features = weight.shape[::-1] if not fan_in_fan_out else weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal the weight's in_features {in_features}, got x of shape "
                         f"{tuple(x.shape)}")
    if bias is not None:
        checks.check_tensor("bias", bias, shape=(out_features,))
    checks.check_same("x", x, weight=weight, bias=bias)
    name = backends.choose(x.device, backend)
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
    if indices.device != a.device or indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D int32 / int64 tensor on {a.device}, got {indices.dtype} "
                         f"{tuple(indices.shape)} on {indices.device}")
    return _sddmm(a, b, indices, backends.choose(a.device, backend))


@torch.no_grad()
def scatter_delta_(weight, base_values, values, indices, backend=None):
    """weight.flatten()[indices] = base_values + values (summed in fp32, rounded once to weight's dtype), in place;
    returns weight. `base_values` are W0's entries at `indices`, so the result never depends on what the weight
    held there before."""
    _check_delta(weight, values, indices, base_values)
    _scatter(weight, base_values, values, indices, backends.choose(weight.device, backend))
    return weight
