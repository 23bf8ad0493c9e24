"""LoRA linear: y = x W^T + bias + scaling * (dropout(x) A^T) B^T, with PEFT's shapes A [r, in], B [out, r].

Reference first (the oracle of every test), then the autograd Functions of the `torch`/`ext` and `triton`
backends, then the public entry point `lora_linear`.
"""
import torch
import torch.nn.functional as F

from fastpeft import backends
from fastpeft.ops import autocast, checks
from fastpeft.ops.dropout import dropout_ref, seed_tensor

# Decode-sized inputs take the one-launch Triton forward up to this many rows.
SMALL_M = 64
# Largest rank the Triton kernels take (the rank-64 builds are the ones compiled ahead of time for sm_80 / sm_90;
# fp32 at 256 needs more shared memory than an A100 has); higher ranks run on the torch backend.
TRITON_MAX_RANK = 64


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=0):
    """Plain PyTorch LoRA linear with the shared dropout mask; autograd gives every gradient."""
    x2d = x.reshape(-1, x.shape[-1])
    dropped = dropout_ref(x2d, dropout_p, seed).reshape(x.shape)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_a), lora_b)


def _fold_pays(x2d: torch.Tensor, weight: torch.Tensor, dropout_p: float) -> bool:
    """Whether to run x (W + s B A)^T as one GEMM instead of adding a separate low-rank product.

    Exact in fp32 up to rounding; in bf16/fp16 the rounded sum would swallow a small delta, so fp32 only.
    Folding costs an [out, in] temporary per pass, which pays once rows outnumber N K / (N + K)."""
    n, k = weight.shape
    return dropout_p == 0.0 and x2d.dtype == torch.float32 and x2d.shape[0] * (n + k) >= 2 * n * k


def _folded_weight(weight, lora_a, lora_b, scaling):
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling)


class LoraLinearTorch(torch.autograd.Function):
    """Hand-fused PyTorch: one output buffer, addmm epilogues, and a backward that regenerates the dropout mask
    from its seed, so only x and the [M, r] shrink are saved (only x when the weight is folded). With `use_ext`
    (the `ext` backend) the low-rank products run in the C++ extension's fused passes, which read each [M, K] /
    [M, N] operand once and beat BLAS's thin GEMMs on every dtype (fp32 1.2-1.6x per pass on one core, less
    where two threads share the machine; bf16 / fp16, whose thin GEMMs torch runs slowly on CPU, 3-20x)."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, use_ext):
        if _fold_pays(x2d, weight, dropout_p):  # the shrink is left to the backward, which reads x anyway
            shrink = None
            folded = _folded_weight(weight, lora_a, lora_b, scaling)
            out = x2d.mm(folded.t()) if bias is None else torch.addmm(bias, x2d, folded.t())
        elif use_ext:
            # bias + low-rank term written in one read of x (with the fp32 shrink), then the base GEMM accumulates
            # into it: the output is written once more, never read back for an add.
            out, shrink = backends.ext_ops().lora_lowrank_out(x2d, lora_a, lora_b, bias, scaling, seed, dropout_p)
            out.addmm_(x2d, weight.t())
        else:
            shrink = dropout_ref(x2d, dropout_p, seed).mm(lora_a.t())
            out = x2d.mm(weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())
            out.addmm_(shrink.to(x2d.dtype), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, shrink)
        ctx.config = (scaling, dropout_p, seed, use_ext, bias is not None)
        return out

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, shrink = ctx.saved_tensors
        scaling, dropout_p, seed, use_ext, has_bias = ctx.config
        need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        dx = da = db = None
        if shrink is None:  # folded forward: no dropout, fp32
            if need_dx:
                dx = dy.mm(_folded_weight(weight, lora_a, lora_b, scaling))
            if need_da or need_db:
                da, db = LoraLinearTorch._factor_grads(x2d, dy, lora_a, lora_b, scaling, use_ext)
        elif use_ext:
            # One read of dy gives G = s dy B and dB; one read of x gives dA and the masked G A.
            ext = backends.ext_ops()
            grad_lowrank, db = ext.lora_dy_pass(dy, lora_b, shrink, scaling)  # fp32 [M, r], [N, r]
            if need_dx:  # the masked G A written first (with dA), then the GEMM accumulates dy W into it
                dx = torch.empty_like(x2d, memory_format=torch.contiguous_format)
                da = ext.lora_dx_pass_(x2d, grad_lowrank, lora_a, dx, seed, dropout_p, accumulate=False)
                dx.addmm_(dy, weight)
            elif need_da:
                da = ext.lora_da_pass(x2d, grad_lowrank, lora_a, seed, dropout_p)
        else:
            grad_lowrank, db = dy.mm(lora_b).mul_(scaling), dy.t().mm(shrink).mul_(scaling)  # [M, r], [N, r]
            if need_dx and dropout_p == 0.0:
                dx = dy.mm(weight).addmm_(grad_lowrank, lora_a)
            elif need_dx:  # G A masked with the forward's mask (same positions, same 1/(1-p))
                dx = dy.mm(weight).add_(dropout_ref(grad_lowrank.mm(lora_a), dropout_p, seed))
            if need_da:  # BLAS runs x^T G faster than G^T x
                da = dropout_ref(x2d, dropout_p, seed).t().mm(grad_lowrank).t()
        da = da.to(lora_a.dtype) if need_da else None
        db = db.to(lora_b.dtype) if need_db else None
        dw = dy.t().mm(x2d) if need_dw else None
        dbias = dy.sum(0) if need_dbias and has_bias else None
        return dx, dw, dbias, da, db, None, None, None, None

    @staticmethod
    def _factor_grads(x2d, dy, lora_a, lora_b, scaling, use_ext):
        """dA = s (dy B)^T x and dB = s dy^T (x A^T) without dropout; the extension reads x and dy once for both."""
        if use_ext:
            return backends.ext_ops().lora_grad_pass(x2d, dy, lora_a, lora_b, scaling)
        grad_lowrank = dy.mm(lora_b).mul_(scaling)
        return x2d.t().mm(grad_lowrank).t(), dy.t().mm(x2d.mm(lora_a.t())).mul_(scaling)


class LoraLinearTriton(torch.autograd.Function):
    """Fused Triton kernels: shrink + one GEMM with the low-rank term and bias in its epilogue (one launch for
    decode-sized inputs); backward: one pass over dy for G and dB, one GEMM for dx that also accumulates dA."""

    @staticmethod
    def forward(ctx, x2d, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        from fastpeft.kernels import lora as kernels

        if x2d.shape[0] <= SMALL_M:
            out, shrink = kernels.lora_forward_small(x2d, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        else:
            shrink = kernels.lora_shrink(x2d, lora_a, dropout_p, seed)
            out = kernels.lora_forward(x2d, weight, bias, shrink, lora_b, scaling)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, shrink)
        ctx.config = (scaling, dropout_p, seed, bias is not None)
        return out

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.kernels import lora as kernels

        x2d, weight, lora_a, lora_b, shrink = ctx.saved_tensors
        scaling, dropout_p, seed, has_bias = ctx.config
        need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        grad_lowrank, db = kernels.lora_backward_shrink(dy, lora_b, shrink, scaling)
        dx, da = kernels.lora_backward_dx(dy, weight, grad_lowrank, lora_a, x2d, dropout_p, seed, need_dx)
        da = da.to(lora_a.dtype) if need_da else None
        db = db.to(lora_b.dtype) if need_db else None
        dw = dy.t().mm(x2d) if need_dw else None
        dbias = dy.sum(0) if need_dbias and has_bias else None
        return dx, dw, dbias, da, db, None, None, None


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    checks.check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    checks.check_tensor("weight", weight, dim=2)
    out_features, in_features = weight.shape
    if in_features < 1:
        raise ValueError(f"weight must have in_features >= 1, got weight of shape {tuple(weight.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must equal weight's in_features {in_features}, got x of shape {tuple(x.shape)}")
    checks.check_tensor("lora_a", lora_a, dim=2)
    rank = lora_a.shape[0]
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got lora_a of shape {tuple(lora_a.shape)}")
    checks.check_tensor("lora_a", lora_a, shape=(rank, in_features))
    checks.check_tensor("lora_b", lora_b, shape=(out_features, rank))
    if bias is not None:
        checks.check_tensor("bias", bias, shape=(out_features,))
    checks.check_same("x", x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    checks.check_finite("scaling", scaling)
    checks.check_probability("dropout_p", dropout_p)
    checks.check_seed(seed)


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, training=True, seed=None, backend=None):
    """x @ weight.T + bias + scaling * (dropout(x) @ lora_a.T) @ lora_b.T for x of shape [..., in].

    weight [out, in] (may be a transposed view, e.g. of a GPT-2 Conv1D weight), lora_a [r, in], lora_b [out, r].
    Dropout applies only when `training`; its mask comes from `seed` (drawn from torch's generator when None).
    `backend` overrides FASTPEFT_BACKEND for this call (see fastpeft.backends). Under torch.autocast it computes
    in autocast's dtype, as nn.Linear does (fastpeft.ops.autocast)."""
    x, weight, bias, lora_a, lora_b = autocast.cast(x, weight, bias, lora_a, lora_b)
    _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    dropout_p = float(dropout_p) if training else 0.0
    seed = seed_tensor(seed, dropout_p)
    name = backends.choose(x.device, backend, dtype=x.dtype)
    rank = lora_a.shape[0]
    if name == "triton" and rank > TRITON_MAX_RANK:
        if backends.requested(backend) == "triton":
            raise ValueError(f"lora_a of shape {tuple(lora_a.shape)}: the triton backend supports LoRA ranks up to "
                             f"{TRITON_MAX_RANK}, got {rank}")
        name = "torch"
    if name == "reference":
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, float(scaling), dropout_p, seed)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:  # nothing to launch kernels on
        name = "torch"
    if name == "triton":
        out = LoraLinearTriton.apply(x2d, weight, bias, lora_a, lora_b, float(scaling), dropout_p, seed)
    else:
        out = LoraLinearTorch.apply(x2d, weight, bias, lora_a, lora_b, float(scaling), dropout_p, seed, name == "ext")
    return out.reshape(*x.shape[:-1], weight.shape[0])
