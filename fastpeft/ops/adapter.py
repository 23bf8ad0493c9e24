"""Bottleneck adapter: y = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up).

h [..., d], w_down [m, d], b_down [m], w_up [d, m], b_up [d]; `residual` defaults to h (Pfeiffer / Houlsby
placement after the sublayer), or is given separately (e.g. the sublayer's input), and then gets its own gradient.
Reference first (the oracle of every test), then the autograd Functions of the `torch`/`ext` and `triton`
backends, then the public entry point `bottleneck_adapter`.
"""
import torch
import torch.nn.functional as F

from fastpeft import backends
from fastpeft.ops import autocast, checks
from fastpeft.ops.dropout import dropout_ref, keep_mask, seed_tensor

ACTIVATIONS = ("relu", "gelu", "silu")  # gelu is the exact (erf) GELU, torch's default
# Widest bottleneck the Triton kernels keep on chip; wider ones run on the torch backend.
TRITON_MAX_WIDTH = 256

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def bottleneck_adapter_ref(h, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None,
                           dropout_p=0.0, seed=0):
    """Plain PyTorch adapter with the shared dropout mask; autograd gives every gradient."""
    h2d = h.reshape(-1, h.shape[-1])
    dropped = dropout_ref(h2d, dropout_p, seed).reshape(h.shape)
    up = F.linear(_ACT[activation](F.linear(dropped, w_down, b_down)), w_up, b_up)
    return (h if residual is None else residual) + scaling * up


def _act_backward(activation: str, grad: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """d act / d pre applied to `grad`; `saved` is relu's output, or gelu's / silu's input."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, saved)
    return torch.ops.aten.silu_backward(grad, saved)


def _activated(pre, activation, ones_column: bool):
    """act(pre), in place for relu; with `ones_column`, in a fresh [rows, m + 1] buffer whose last column is 1,
    so that one addmm with [w_up | b_up] adds the up-projection and its bias in a single pass."""
    if not ones_column:
        return pre.relu_() if activation == "relu" else _ACT[activation](pre)
    rows, width = pre.shape
    a = pre.new_empty(rows, width + 1)
    a[:, width] = 1.0
    if activation == "relu":
        a[:, :width].copy_(pre).relu_()
    else:
        a[:, :width] = _ACT[activation](pre)
    return a


class BottleneckAdapterTorch(torch.autograd.Function):
    """Hand-fused PyTorch. Forward: the down-projection as one addmm, relu in place, and one addmm for
    up-projection + bias + residual (the residual is addmm's accumulator). Saves h, the weights and one [rows, m] tensor (relu's output, else the
    pre-activation); no copy of the dropped h: the backward regenerates the mask from its seed (through the C++
    extension when `use_ext`)."""

    @staticmethod
    def forward(ctx, h2d, w_down, b_down, w_up, b_up, r2d, activation, scaling, dropout_p, seed, use_ext):
        dropped = h2d
        if dropout_p > 0.0:
            dropped = _dropout(h2d, dropout_p, seed, use_ext)
        pre = dropped.mm(w_down.t()) if b_down is None else torch.addmm(b_down, dropped, w_down.t())
        del dropped
        a = _activated(pre, activation, b_up is not None)
        up = w_up if b_up is None else torch.cat([w_up, b_up[:, None]], dim=1)
        out = torch.addmm(h2d if r2d is None else r2d, a, up.t(), alpha=scaling)
        ctx.save_for_backward(h2d, w_down, up, a if activation == "relu" else pre)
        ctx.config = (activation, scaling, dropout_p, seed, use_ext, b_down is not None, b_up is not None, r2d is None)
        return out

    @staticmethod
    def backward(ctx, dy):
        h2d, w_down, up, saved = ctx.saved_tensors
        activation, scaling, dropout_p, seed, use_ext, has_b_down, has_b_up, residual_is_h = ctx.config
        need_dh, need_dw_down, need_db_down, need_dw_up, need_db_up, need_dr = ctx.needs_input_grad[:6]
        width = w_down.shape[0]
        a = saved if activation == "relu" else _activated(saved, activation, has_b_up)
        dw_up = db_up = dh = dw_down = db_down = None
        if need_dw_up or need_db_up:
            d_up = dy.t().mm(a).mul_(scaling)  # [d, m (+1)]: the last column is db_up
            dw_up = d_up[:, :width].contiguous() if need_dw_up else None
            db_up = d_up[:, width].contiguous() if need_db_up and has_b_up else None
        if need_dh or need_dw_down or need_db_down:
            d_pre = _act_backward(activation, dy.mm(up[:, :width]).mul_(scaling), saved[:, :width])  # [rows, m]
            db_down = d_pre.sum(0) if need_db_down and has_b_down else None
            residual_grad = dy if need_dh and residual_is_h else None
            dh, dropped = _dh_and_dropped(h2d, d_pre, w_down, residual_grad, dropout_p, seed, use_ext, need_dh)
            dw_down = dropped.t().mm(d_pre).t() if need_dw_down else None  # BLAS is faster at [d, m] out
        return dh, dw_down, db_down, dw_up, db_up, (dy if need_dr else None), None, None, None, None, None


def _dropout(t, p, seed, use_ext):
    """Inverted dropout of a 2-D tensor with the shared mask, through the extension when `use_ext`."""
    return backends.ext_ops().dropout_forward(t, seed, p) if use_ext else dropout_ref(t, p, seed)


def _dh_and_dropped(h2d, d_pre, w_down, residual_grad, p, seed, use_ext, need_dh):
    """(dh, dropout(h)): dh = residual_grad + mask/(1-p) * (d_pre @ w_down), one mask for both."""
    if p == 0.0:
        if not need_dh:
            return None, h2d
        if residual_grad is None:
            return d_pre.mm(w_down), h2d
        return torch.addmm(residual_grad, d_pre, w_down), h2d
    if not need_dh:
        return None, _dropout(h2d, p, seed, use_ext)
    # Masking a fresh [rows, d] product twice (it, then h) and adding dy beats one fused pass that updates a
    # copy of dy in place: the copy costs as much as the add, and the fused pass reads three [rows, d] tensors.
    through = d_pre.mm(w_down)
    if use_ext:
        dh, dropped = _dropout(through, p, seed, True), _dropout(h2d, p, seed, True)
    else:
        factor = keep_mask(seed, h2d.shape[0], h2d.shape[1], p, h2d.device).to(h2d.dtype)
        scale = 1.0 / (1.0 - p)
        dh, dropped = through.mul_(factor).mul_(scale), h2d * factor * scale
    return (dh if residual_grad is None else dh.add_(residual_grad)), dropped


class BottleneckAdapterTriton(torch.autograd.Function):
    """Fused Triton kernels (kernels/adapter.py): one forward launch per row block with the bottleneck on chip,
    which also stores the fp32 pre-activation [rows, m]; backward in two launches (see the kernel module)."""

    @staticmethod
    def forward(ctx, h2d, w_down, b_down, w_up, b_up, r2d, activation, scaling, dropout_p, seed):
        from fastpeft.kernels import adapter as kernels

        out, pre = kernels.adapter_forward(h2d, w_down, b_down, w_up, b_up, r2d, activation, scaling, dropout_p, seed)
        ctx.save_for_backward(h2d, w_down, w_up, pre)
        ctx.config = (activation, scaling, dropout_p, seed, b_down is not None, b_up is not None, r2d is None)
        return out

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.kernels import adapter as kernels

        h2d, w_down, w_up, pre = ctx.saved_tensors
        activation, scaling, dropout_p, seed, has_b_down, has_b_up, residual_is_h = ctx.config
        need_dh, need_dw_down, need_db_down, need_dw_up, need_db_up, need_dr = ctx.needs_input_grad[:6]
        d_pre, dw_up, db_up, db_down = kernels.adapter_backward_up(dy, w_up, pre, activation, scaling)
        dh, dw_down = kernels.adapter_backward_down(dy, d_pre, w_down, h2d, dropout_p, seed, need_dh, residual_is_h)
        cast = lambda t, like, need: t.to(like.dtype) if need else None  # noqa: E731
        return (dh, cast(dw_down, w_down, need_dw_down), cast(db_down, w_down, need_db_down and has_b_down),
                cast(dw_up, w_up, need_dw_up), cast(db_up, w_up, need_db_up and has_b_up),
                (dy if need_dr else None), None, None, None, None)


def _validate(h, w_down, b_down, w_up, b_up, activation, scaling, residual, dropout_p, seed):
    checks.check_tensor("h", h)
    if h.dim() < 1:
        raise ValueError("h must have at least one dimension (its last is the hidden size d)")
    checks.check_tensor("w_down", w_down, dim=2)
    width, hidden = w_down.shape
    if hidden < 1:
        raise ValueError(f"w_down must have in_features (the hidden size d) >= 1, got shape {tuple(w_down.shape)}")
    if h.shape[-1] != hidden:
        raise ValueError(f"h's last dimension must equal w_down's in_features {hidden}, got h of shape {tuple(h.shape)}")
    if width < 1:
        raise ValueError(f"bottleneck width must be >= 1, got w_down of shape {tuple(w_down.shape)}")
    checks.check_tensor("w_up", w_up, shape=(hidden, width))
    if b_down is not None:
        checks.check_tensor("b_down", b_down, shape=(width,))
    if b_up is not None:
        checks.check_tensor("b_up", b_up, shape=(hidden,))
    if residual is not None:
        checks.check_tensor("residual", residual, shape=tuple(h.shape))
    checks.check_same("h", h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=residual)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    checks.check_finite("scaling", scaling)
    checks.check_probability("dropout_p", dropout_p)
    checks.check_seed(seed)


def bottleneck_adapter(h, w_down, b_down, w_up, b_up, activation="relu", scaling=1.0, residual=None, dropout_p=0.0,
                       training=True, seed=None, backend=None):
    """residual + scaling * (act(dropout(h) @ w_down.T + b_down) @ w_up.T + b_up) for h of shape [..., d].

    w_down [m, d], b_down [m] or None, w_up [d, m], b_up [d] or None; `residual` (shape of h) defaults to h.
    Dropout applies to the adapter's input only when `training`; its mask comes from `seed` (drawn from torch's
    generator when None). `backend` overrides FASTPEFT_BACKEND for this call (see fastpeft.backends). Under
    torch.autocast it computes in autocast's dtype as nn.Linear does, residual included (fastpeft.ops.autocast)."""
    h, w_down, b_down, w_up, b_up, residual = autocast.cast(h, w_down, b_down, w_up, b_up, residual)
    _validate(h, w_down, b_down, w_up, b_up, activation, scaling, residual, dropout_p, seed)
    dropout_p = float(dropout_p) if training else 0.0
    seed = seed_tensor(seed, dropout_p)
    name = backends.choose(h.device, backend, ext_helps=dropout_p > 0.0, dtype=h.dtype)
    if name == "reference":
        return bottleneck_adapter_ref(h, w_down, b_down, w_up, b_up, activation, float(scaling), residual,
                                      dropout_p, seed)
    width = w_down.shape[0]
    if name == "triton" and width > TRITON_MAX_WIDTH:
        if backends.requested(backend) == "triton":
            raise ValueError(f"the triton backend supports bottleneck widths up to {TRITON_MAX_WIDTH}, got {width}")
        name = "torch"
    h2d = h.reshape(-1, h.shape[-1])
    r2d = None if residual is None else residual.reshape(-1, h.shape[-1])
    if h2d.shape[0] == 0:  # nothing to launch kernels on
        name = "torch"
    args = (h2d, w_down, b_down, w_up, b_up, r2d, activation, float(scaling), dropout_p, seed)
    if name == "triton":
        out = BottleneckAdapterTriton.apply(*args)
    else:
        out = BottleneckAdapterTorch.apply(*args, name == "ext")
    return out.reshape(h.shape)
