"""LoRA linear benchmark: the frozen base layer, the reference, fastpeft and HF PEFT, on the same tensors.

    python -m bench.lora [--shape M,K,N] [--rank R] [--alpha A] [--dropout P] [--backend B] [common flags]

x [M, K] requires grad; the base nn.Linear (weight [N, K], bias [N]) is frozen; A [r, K] and B [N, r] are trainable
and random (B nonzero, so no product is trivially zero) and shared by all implementations: PEFT's
lora_A / lora_B weights are these very parameters. Implementations:
  base       F.linear with the frozen weight and bias, the cost that LoRA adds to,
  reference  fastpeft.ops.lora.lora_linear_ref (plain PyTorch),
  fastpeft   fastpeft.ops.lora.lora_linear with `--backend` (default: auto / FASTPEFT_BACKEND),
  peft       peft.tuners.lora.layer.Linear over the same base layer, in train mode.
Measured per implementation:
  fwd_ms           median forward time, recording autograd as in training,
  fwd_bwd_ms       median forward + backward with a fixed random dy (gradients cleared, untimed, before each),
  saved_bytes      activation memory the layer keeps for backward: bytes of the distinct storages that one
                   forward saves (saved_tensors_hooks), EXCLUDING the storages of x, weight, bias, A and B,
                   which are alive anyway; so it counts e.g. PEFT's dropped-out copy of x and fastpeft's [M, r]
                   shrink x A^T,
  saved_bytes_all  the same, including the storages of the inputs and parameters,
  peak_bytes       on CUDA, growth of max_memory_allocated over one fwd+bwd; null on CPU.
Before timing, the output and the gradients of x, A and B of reference, fastpeft and peft are checked against a
float64 reference with dropout off (with dropout their masks differ by design); a mismatch aborts the run.
"""
from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from bench import common
from fastpeft import backends
from fastpeft.ops.lora import lora_linear, lora_linear_ref

IMPLS = ("base", "reference", "fastpeft", "peft")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=functools.partial(common.parse_sizes, names="MKN"),
                        default=common.parse_sizes("4096,768,768", "MKN"), help="M,K,N rows, in, out (4096,768,768)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0, help="lora_alpha; scaling = alpha / rank")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--backend", choices=backends.BACKENDS, help="fastpeft backend (default: FASTPEFT_BACKEND)")
    common.add_common_args(parser)
    return parser.parse_args(argv)


class Problem:
    """The shared tensors and the four implementations over them."""

    def __init__(self, shape: dict, rank: int, alpha: float, dropout: float, backend: str | None,
                 device: torch.device, dtype: torch.dtype):
        m, k, n = shape["M"], shape["K"], shape["N"]
        make = functools.partial(torch.randn, device=device, dtype=dtype)
        self.base = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
        self.x = make(m, k).requires_grad_()
        self.lora_a = torch.nn.Parameter(make(rank, k) / math.sqrt(k))
        self.lora_b = torch.nn.Parameter(make(n, rank) / math.sqrt(rank))
        self.dy = make(m, n)
        self.scaling, self.dropout, self.backend = alpha / rank, dropout, backend
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout)
        self.peft = PeftLoraLinear(self.base, "default", config=config, r=rank, lora_alpha=alpha)
        self.peft.lora_A["default"].weight = self.lora_a
        self.peft.lora_B["default"].weight = self.lora_b
        self.peft.train()

    @property
    def alive(self) -> tuple[torch.Tensor, ...]:
        return self.x, self.base.weight, self.base.bias, self.lora_a, self.lora_b

    def forward(self, impl: str, dropout: float | None = None) -> torch.Tensor:
        p = self.dropout if dropout is None else dropout
        args = (self.x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scaling)
        if impl == "base":
            return F.linear(self.x, self.base.weight, self.base.bias)
        if impl == "reference":
            return lora_linear_ref(*args, dropout_p=p)
        if impl == "fastpeft":
            return lora_linear(*args, dropout_p=p, backend=self.backend)
        return self.peft(self.x)

    def fwd_bwd(self, impl: str) -> None:
        self.forward(impl).backward(self.dy)

    def clear_grads(self) -> None:
        self.x.grad = self.lora_a.grad = self.lora_b.grad = None

    def check(self, dtype: torch.dtype) -> None:
        """Output and gradients of each LoRA implementation, without dropout, against float64."""
        exact_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in self.alive]
        x, weight, bias, lora_a, lora_b = exact_inputs
        exact_out = lora_linear_ref(x, weight, bias, lora_a, lora_b, self.scaling)
        exact_out.backward(self.dy.double())
        self.peft.eval()  # turns PEFT's dropout off
        for impl in ("reference", "fastpeft", "peft"):
            self.clear_grads()
            out = self.forward(impl, dropout=0.0)
            out.backward(self.dy)
            common.check_close(f"{impl} output", out, exact_out, dtype)
            for name, got, exact in (("x", self.x, x), ("A", self.lora_a, lora_a), ("B", self.lora_b, lora_b)):
                common.check_close(f"{impl} grad of {name}", got.grad, exact.grad, dtype)
        self.clear_grads()
        self.peft.train()


def ratios(results: dict, shrink_bytes: int) -> dict:
    def ratio(a: str, b: str, key: str = "fwd_bwd_ms") -> float:
        return results[a][key] / results[b][key]

    return {
        "fastpeft/base": ratio("fastpeft", "base"),
        "fastpeft/base_fwd": ratio("fastpeft", "base", "fwd_ms"),
        "peft/fastpeft": ratio("peft", "fastpeft"),
        "peft/fastpeft_fwd": ratio("peft", "fastpeft", "fwd_ms"),
        "reference/fastpeft": ratio("reference", "fastpeft"),
        "saved_extra_over_base_bytes": results["fastpeft"]["saved_bytes"] - results["base"]["saved_bytes"],
        "peft_saved_extra_over_base_bytes": results["peft"]["saved_bytes"] - results["base"]["saved_bytes"],
        "shrink_bytes": shrink_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = common.setup(args)
    problem = Problem(args.shape, args.rank, args.alpha, args.dropout, args.backend, device, dtype)
    problem.check(dtype)
    results = common.measure(problem, IMPLS, device, args.repeats, args.warmup)
    # The backend that lora_linear picks for these inputs (the extension only where dropout needs it).
    backend = backends.choose(device, args.backend)
    params = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "backend": backend}
    shrink_bytes = args.shape["M"] * args.rank * dtype.itemsize
    return common.finish(common.make_report("lora", args, args.shape, params, results, ratios(results, shrink_bytes)), args)


if __name__ == "__main__":
    main()
