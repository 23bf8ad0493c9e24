"""Bottleneck adapter benchmark: the copy and GEMM floors, the adapter in plain nn modules, the reference, fastpeft.

    python -m bench.adapter [--shape M,D] [--bottleneck m] [--activation A] [--scaling S] [--dropout P]
                            [--residual] [--backend B] [common flags]

h [M, D] requires grad; w_down [m, D], b_down [m], w_up [D, m], b_up [D] are trainable and random (w_up nonzero,
so no product is trivially zero) and shared by all implementations: the plain module's nn.Linear weights and biases
are these very parameters. `--residual` adds a separate residual input (Houlsby placement) that also requires grad.
Implementations:
  copy       h.clone(): one read and one write of [M, D], what any adapter must at least move,
  floor      the six dense GEMMs of a forward and backward alone, autograd-free (see `Problem.floor`): the matmul
             work any implementation must do,
  plain      the adapter as users write it in PyTorch modules (AdapterHub's bottleneck layer, see `PlainAdapter`):
             nn.Dropout, nn.Linear down, activation module, nn.Linear up, residual add; autograd's backward,
  reference  fastpeft.ops.adapter.bottleneck_adapter_ref (plain PyTorch with fastpeft's hash dropout),
  fastpeft   fastpeft.ops.adapter.bottleneck_adapter with `--backend` (default: auto / FASTPEFT_BACKEND).
Measured per implementation, as in bench.lora: fwd_ms, fwd_bwd_ms (fixed random dy, gradients cleared untimed),
saved_bytes (activation memory kept for backward, excluding the inputs and parameters), saved_bytes_all,
peak_bytes (CUDA only). The table's `x base` is the time over the floor's. Before timing, the output and every
gradient of plain, reference and fastpeft are checked against a float64 reference with dropout off (with dropout
their masks differ by design: plain draws torch's RNG, fastpeft hashes a seed); a mismatch aborts the run.
"""
from __future__ import annotations

import argparse
import functools

import torch
from torch import nn

from bench import common
from fastpeft import backends
from fastpeft.ops.adapter import ACTIVATIONS, bottleneck_adapter, bottleneck_adapter_ref

IMPLS = ("copy", "floor", "plain", "reference", "fastpeft")

# The activation modules a user puts between the projections; gelu is nn.GELU()'s exact (erf) GELU, as fastpeft's.
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=functools.partial(common.parse_sizes, names="MD"),
                        default=common.parse_sizes("4096,768", "MD"), help="M,D rows, hidden size (4096,768)")
    parser.add_argument("--bottleneck", type=int, default=64, help="bottleneck width m (64)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    parser.add_argument("--scaling", type=float, default=1.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--residual", action="store_true", help="a separate residual input (default: h)")
    parser.add_argument("--backend", choices=backends.BACKENDS, help="fastpeft backend (default: FASTPEFT_BACKEND)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


class PlainAdapter(nn.Module):
    """The bottleneck adapter as users write it in PyTorch modules, laid out as AdapterHub's bottleneck layer
    (`adapter_down` = nn.Linear + activation module, `adapter_up` = nn.Linear, an nn.Dropout, the residual added
    last), computing fastpeft's function: residual + scaling * up(act(down(dropout(h)))).

    Where it departs from AdapterHub, it is to compute that same function, or to be no slower:
    - the nn.Dropout acts on the adapter's input, where fastpeft's dropout sits (AdapterHub's acts on the adapter's
      output; either is one mask over [M, D] in the forward and one in the backward, but here autograd also keeps
      the dropped copy of h for the down-projection's weight gradient, as a user's module would);
    - the multiplication by `scaling` is left out when it is 1 (AdapterHub multiplies always: one more pass over
      [M, D] each way that would flatter fastpeft)."""

    def __init__(self, hidden: int, width: int, activation: str, scaling: float, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        # Built on the meta device: the Problem assigns its own parameters (no init, no memory, no RNG draws).
        self.adapter_down = nn.Sequential(nn.Linear(hidden, width, device="meta"), ACTIVATION_MODULES[activation]())
        self.adapter_up = nn.Linear(width, hidden, device="meta")
        self.scaling = scaling

    def forward(self, x: torch.Tensor, residual_input: torch.Tensor | None = None) -> torch.Tensor:
        up = self.adapter_up(self.adapter_down(self.dropout(x)))
        if self.scaling != 1.0:
            up = up * self.scaling
        return (x if residual_input is None else residual_input) + up


class Problem:
    """The shared tensors and the implementations over them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        rows, hidden, width = args.shape["M"], args.shape["D"], args.bottleneck
        make = functools.partial(torch.randn, device=device, dtype=dtype)
        self.h = make(rows, hidden).requires_grad_()
        self.residual = make(rows, hidden).requires_grad_() if args.residual else None
        self.params = [nn.Parameter(make(width, hidden) / hidden**0.5), nn.Parameter(make(width)),
                       nn.Parameter(make(hidden, width) / width**0.5), nn.Parameter(make(hidden))]
        self.dy = make(rows, hidden)
        self.activation, self.scaling, self.dropout, self.backend = (args.activation, args.scaling, args.dropout,
                                                                     args.backend)
        self.plain = PlainAdapter(hidden, width, args.activation, args.scaling, args.dropout).train()
        down, up = self.plain.adapter_down[0], self.plain.adapter_up
        down.weight, down.bias, up.weight, up.bias = self.params
        # The floor's operands: the same storages, outside autograd.
        self.floor_operands = (self.h.detach(), self.params[0].detach(), self.params[2].detach(), self.dy)

    @property
    def alive(self) -> tuple:
        return (self.h, self.residual, *self.params)

    @property
    def leaves(self) -> list:
        return [t for t in self.alive if t is not None]

    def floor(self, backward: bool) -> tuple[torch.Tensor, ...]:
        """The dense matmul work of an adapter's forward (two GEMMs) and, with `backward`, its backward (four more),
        autograd-free, at the benchmark's shapes. Every implementation computes these six products (any dropout
        mask, activation, bias and residual add are elementwise work on top); none is fused away, as each output is
        needed: the forward's [M, m] bottleneck and [M, D] output, and in the backward the bottleneck gradient, the
        two weight gradients and the [M, D] input gradient. So their time alone (outputs allocated, as an autograd
        layer's must be) is a lower bound on any implementation's fwd / fwd+bwd that runs them through this BLAS.
        The up GEMM takes the down GEMM's output itself (no activation), dy is the benchmark's fixed dy.
        Returns (y, dh, dw_down, dw_up) with backward, else (pre, y)."""
        x, w_down, w_up, dy = self.floor_operands
        pre = x.mm(w_down.t())               # [M, m]  forward down
        y = pre.mm(w_up.t())                 # [M, D]  forward up
        if not backward:
            return pre, y
        d_pre = dy.mm(w_up)                  # [M, m]  gradient of the bottleneck
        dw_up = dy.t().mm(pre)               # [D, m]  up-projection's weight gradient
        dh = d_pre.mm(w_down)                # [M, D]  input gradient (the residual's dy adds elementwise)
        dw_down = d_pre.t().mm(x)            # [m, D]  down-projection's weight gradient
        return y, dh, dw_down, dw_up

    def forward(self, impl: str, dropout: float | None = None) -> torch.Tensor:
        h, residual, w_down, b_down, w_up, b_up = self.alive
        p = self.dropout if dropout is None else dropout
        if impl == "copy":
            return h.clone()
        if impl == "floor":
            return self.floor(backward=False)
        if impl == "plain":
            self.plain.dropout.p = p
            return self.plain(h, residual)
        args = (h, w_down, b_down, w_up, b_up, self.activation, self.scaling, residual, p)
        if impl == "reference":
            return bottleneck_adapter_ref(*args)
        return bottleneck_adapter(*args, backend=self.backend)

    def fwd_bwd(self, impl: str) -> None:
        if impl == "floor":
            return self.floor(backward=True)
        self.forward(impl).backward(self.dy)

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def check(self, dtype: torch.dtype, impls=("plain", "reference", "fastpeft")) -> None:
        """Output and every gradient of `impls`, without dropout, against float64."""
        exact = [None if t is None else t.detach().double().requires_grad_() for t in self.alive]
        exact_out = bottleneck_adapter_ref(exact[0], *exact[2:], self.activation, self.scaling, exact[1])
        exact_out.backward(self.dy.double())
        for impl in impls:
            self.clear_grads()
            out = self.forward(impl, dropout=0.0)
            out.backward(self.dy)
            common.check_close(f"{impl} output", out, exact_out, dtype)
            for got, want in zip(self.alive, exact):
                if got is not None:
                    common.check_close(f"{impl} gradient of a {tuple(got.shape)} input", got.grad, want.grad, dtype)
        self.clear_grads()
        self.plain.dropout.p = self.dropout


def ratios(results: dict, bottleneck_bytes: int) -> dict:
    def ratio(a: str, b: str, key: str = "fwd_bwd_ms") -> float:
        return results[a][key] / results[b][key]

    return {
        "fastpeft/floor": ratio("fastpeft", "floor"),
        "fastpeft/floor_fwd": ratio("fastpeft", "floor", "fwd_ms"),
        "plain/fastpeft": ratio("plain", "fastpeft"),
        "plain/fastpeft_fwd": ratio("plain", "fastpeft", "fwd_ms"),
        "plain/floor": ratio("plain", "floor"),
        "reference/fastpeft": ratio("reference", "fastpeft"),
        "reference/fastpeft_fwd": ratio("reference", "fastpeft", "fwd_ms"),
        "fastpeft/copy": ratio("fastpeft", "copy"),
        "fastpeft/copy_fwd": ratio("fastpeft", "copy", "fwd_ms"),
        "bottleneck_bytes": bottleneck_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = common.setup(args)
    problem = Problem(args, device, dtype)
    problem.check(dtype)
    results = common.measure(problem, IMPLS, device, args.repeats, args.warmup)
    # The backend that bottleneck_adapter picks for these inputs (the extension only where dropout needs it).
    backend = backends.choose(device, args.backend, ext_helps=args.dropout > 0.0)
    params = {"bottleneck": args.bottleneck, "activation": args.activation, "scaling": args.scaling,
              "dropout": args.dropout, "residual": args.residual, "backend": backend}
    bottleneck_bytes = args.shape["M"] * args.bottleneck * 4  # the fp32 pre-activation the Triton path keeps
    report = common.make_report("adapter", args, args.shape, params, results, ratios(results, bottleneck_bytes))
    return common.finish(report, args, baseline="floor")


if __name__ == "__main__":
    main()
