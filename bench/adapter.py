"""Bottleneck adapter benchmark: a plain copy of h (the memory-traffic floor), the reference and fastpeft.

    python -m bench.adapter [--shape M,D] [--bottleneck m] [--activation A] [--scaling S] [--dropout P]
                            [--residual] [--backend B] [common flags]

h [M, D] requires grad; w_down [m, D], b_down [m], w_up [D, m], b_up [D] are trainable and random (w_up nonzero,
so no product is trivially zero); `--residual` adds a separate residual input (Houlsby placement) that also
requires grad. Implementations:
  copy       h.clone(): one read and one write of [M, D], what any adapter must at least move,
  reference  fastpeft.ops.adapter.bottleneck_adapter_ref (plain PyTorch),
  fastpeft   fastpeft.ops.adapter.bottleneck_adapter with `--backend` (default: auto / FASTPEFT_BACKEND).
Measured per implementation, as in bench.lora: fwd_ms, fwd_bwd_ms (fixed random dy, gradients cleared untimed),
saved_bytes (activation memory kept for backward, excluding the inputs and parameters), saved_bytes_all,
peak_bytes (CUDA only). Before timing, the output and every gradient of reference and fastpeft are checked
against a float64 reference with dropout off; a mismatch aborts the run.
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench import common
from fastpeft import backends
from fastpeft.ops.adapter import ACTIVATIONS, bottleneck_adapter, bottleneck_adapter_ref

IMPLS = ("copy", "reference", "fastpeft")


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


class Problem:
    """The shared tensors and the implementations over them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
        rows, hidden, width = args.shape["M"], args.shape["D"], args.bottleneck
        make = functools.partial(torch.randn, device=device, dtype=dtype)
        self.h = make(rows, hidden).requires_grad_()
        self.residual = make(rows, hidden).requires_grad_() if args.residual else None
        self.params = [(make(width, hidden) / hidden**0.5).requires_grad_(), make(width).requires_grad_(),
                       (make(hidden, width) / width**0.5).requires_grad_(), make(hidden).requires_grad_()]
        self.dy = make(rows, hidden)
        self.activation, self.scaling, self.dropout, self.backend = (args.activation, args.scaling, args.dropout,
                                                                     args.backend)

    @property
    def alive(self) -> tuple:
        return (self.h, self.residual, *self.params)

    @property
    def leaves(self) -> list:
        return [t for t in self.alive if t is not None]

    def forward(self, impl: str, dropout: float | None = None, tensors=None) -> torch.Tensor:
        h, residual, w_down, b_down, w_up, b_up = self.alive if tensors is None else tensors
        p = self.dropout if dropout is None else dropout
        if impl == "copy":
            return h.clone()
        args = (h, w_down, b_down, w_up, b_up, self.activation, self.scaling, residual, p)
        if impl == "reference":
            return bottleneck_adapter_ref(*args)
        return bottleneck_adapter(*args, backend=self.backend)

    def fwd_bwd(self, impl: str) -> None:
        self.forward(impl).backward(self.dy)

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def check(self, dtype: torch.dtype) -> None:
        """Output and every gradient of reference and fastpeft, without dropout, against float64."""
        exact = [None if t is None else t.detach().double().requires_grad_() for t in self.alive]
        exact_out = bottleneck_adapter_ref(exact[0], *exact[2:], self.activation, self.scaling, exact[1])
        exact_out.backward(self.dy.double())
        for impl in ("reference", "fastpeft"):
            self.clear_grads()
            out = self.forward(impl, dropout=0.0)
            out.backward(self.dy)
            common.check_close(f"{impl} output", out, exact_out, dtype)
            for got, want in zip(self.alive, exact):
                if got is not None:
                    common.check_close(f"{impl} gradient of a {tuple(got.shape)} input", got.grad, want.grad, dtype)
        self.clear_grads()


def ratios(results: dict, bottleneck_bytes: int) -> dict:
    def ratio(a: str, b: str, key: str = "fwd_bwd_ms") -> float:
        return results[a][key] / results[b][key]

    return {
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
    return common.finish(report, args, baseline="copy")


if __name__ == "__main__":
    main()
