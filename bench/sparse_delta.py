"""Sparse-delta (diff pruning, fixed mask) benchmark: the values' gradient and the training step, on the same tensors.

    python -m bench.sparse_delta [--shape M,K,N] [--density D] [--backend B] [common flags]

x [M, K] requires grad; the frozen nn.Linear has weight [N, K] and bias [N]; the mask is round(D * N * K) random
sorted positions of the weight (int32), `values` the trainable fp32 delta there. Implementations, each one way to
run the fixed-mask step "forward, dx, values' gradient":
  base            F.linear with the frozen weight: forward and dx only, the cost the delta adds to,
  dense           the values' gradient as the dense dW = dy^T x (the weight requires grad), then a gather,
  torch_sampled   torch.sparse.sampled_addmm(mask as CSR, dy^T, x) after the frozen linear's backward,
  fastpeft_sddmm  fastpeft.ops.sparse_delta.sddmm (`--backend`) after the frozen linear's backward,
  fastpeft        the whole fixed-mask step: sparse_delta_linear forward + backward (the weight holding W0 + delta)
                  plus the scatter_delta_ update that follows an optimizer step.
Measured per implementation, as in bench.lora: fwd_ms, fwd_bwd_ms (the step; gradients cleared untimed),
saved_bytes / saved_bytes_all (what the forward keeps for backward, without / with the inputs and parameters),
peak_bytes (CUDA only), and grad_ms: the values' gradient alone from a fixed dy and x (null for base and fastpeft,
whose SDDMM is fastpeft_sddmm's). The step cases and then the gradient-only cases run round-robin.
Ratios: the issue's three targets (SDDMM >= 5x faster than dense and than torch_sampled, fastpeft step <= 1.15x
base, trainable state <= 3% of the dense-diff equivalent) with their measured values. Trainable state: values,
their gradient and two Adam moments (fp32), the indices and the kept W0 values, against a dense fp32 delta, its
gradient and two Adam moments; a target that cannot be measured here is null. An implementation that cannot run
on these tensors (torch_sampled in bf16 / fp16 on CPU) is left out and named, with why, in params.unsupported.
Before timing, every implementation's values' gradient (and fastpeft's output and dx) are checked against
float64; a mismatch aborts the run.
"""
from __future__ import annotations

import argparse
import functools
import warnings

import torch
import torch.nn.functional as F

from bench import common
from fastpeft import backends
from fastpeft.ops.sparse_delta import index_dtype, scatter_delta_, sddmm, sparse_delta_linear, sparse_delta_linear_ref

IMPLS = ("base", "dense", "torch_sampled", "fastpeft_sddmm", "fastpeft")
GRAD_IMPLS = ("dense", "torch_sampled", "fastpeft_sddmm")
ADAM_FP32_BYTES = 4 * 4  # a value, its gradient and two Adam moments, fp32
TARGETS = {"sddmm_speedup_over_dense": 5.0, "sddmm_speedup_over_torch_sampled": 5.0, "fastpeft/base": 1.15,
           "trainable_state/dense_diff": 0.03}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sparse_delta", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=functools.partial(common.parse_sizes, names="MKN"),
                        default=common.parse_sizes("4096,768,768", "MKN"), help="M,K,N rows, in, out (4096,768,768)")
    parser.add_argument("--density", type=float, default=0.005, help="fraction of the weight in the mask (0.005)")
    parser.add_argument("--backend", choices=backends.BACKENDS, help="fastpeft backend (default: FASTPEFT_BACKEND)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.density <= 1.0:
        parser.error(f"--density must be in [0, 1], got {args.density}")
    return args


class Problem:
    """The shared tensors and the implementations over them."""

    def __init__(self, shape: dict, density: float, backend: str | None, device: torch.device, dtype: torch.dtype):
        m, k, n = shape["M"], shape["K"], shape["N"]
        make = functools.partial(torch.randn, device=device, dtype=dtype)
        self.base = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
        self.x = make(m, k).requires_grad_()
        self.dy = make(m, n)
        weight = self.base.weight
        nnz = round(density * weight.numel())
        positions = torch.randperm(weight.numel(), device=device)[:nnz]
        self.indices = positions.sort().values.to(index_dtype(weight.numel()))
        self.values = torch.nn.Parameter(torch.randn(nnz, device=device) * 0.01)
        self.base_values = weight.detach().view(-1)[self.indices.long()].clone()
        self.merged = weight.detach().clone()  # W0 + delta at the mask, as SparseDeltaLinear keeps it (base: W0)
        scatter_delta_(self.merged, self.base_values, self.values.detach(), self.indices, backend=backend)
        self.dense_weight = weight.detach().clone().requires_grad_()  # the dense diff's trainable weight
        rows = self.indices.long().div(k, rounding_mode="floor")
        crow = torch.zeros(n + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.csr_mask = torch.sparse_csr_tensor(crow, self.indices.long() % k,
                                                    torch.zeros(nnz, device=device, dtype=dtype), (n, k))
        self.backend = backend

    @property
    def alive(self) -> tuple:
        return self.x, self.base.weight, self.base.bias, self.merged, self.dense_weight, self.values

    # --- the values' gradient alone: [nnz] from dy [M, N] and x [M, K] -------------------------------------------
    def grad_only(self, impl: str) -> torch.Tensor:
        dy, x = self.dy, self.x.detach()
        if impl == "dense":
            return (dy.t() @ x).view(-1).index_select(0, self.indices)
        if impl == "torch_sampled":
            return torch.sparse.sampled_addmm(self.csr_mask, dy.t(), x, beta=0.0).values()
        return sddmm(dy, x, self.indices, backend=self.backend)

    # --- the step ------------------------------------------------------------------------------------------------
    def forward(self, impl: str) -> torch.Tensor:
        if impl == "fastpeft":
            return sparse_delta_linear(self.x, self.merged, self.base.bias, self.values, self.indices,
                                       backend=self.backend)
        weight = self.dense_weight if impl == "dense" else self.base.weight
        return F.linear(self.x, weight, self.base.bias)

    def fwd_bwd(self, impl: str):
        self.forward(impl).backward(self.dy)
        if impl == "fastpeft":  # the merge after the optimizer step (values unchanged here: the same work)
            scatter_delta_(self.merged, self.base_values, self.values.detach(), self.indices, backend=self.backend)
            return self.values.grad
        if impl == "dense":
            return self.dense_weight.grad.view(-1).index_select(0, self.indices)
        if impl in ("torch_sampled", "fastpeft_sddmm"):
            return self.grad_only(impl)
        return None

    def unsupported(self) -> dict[str, str]:
        """Implementations that cannot run on these tensors, with why (sampled_addmm has no CPU bf16 / fp16)."""
        try:
            self.grad_only("torch_sampled")
        except RuntimeError as error:
            return {"torch_sampled": str(error)}
        return {}

    def clear_grads(self) -> None:
        self.x.grad = self.values.grad = self.dense_weight.grad = None

    def check(self, dtype: torch.dtype, impls: tuple) -> None:
        """Every values' gradient (alone and in its step), and fastpeft's output and dx, against float64."""
        x, dy = self.x.detach().double().requires_grad_(), self.dy.double()
        values = self.values.detach().double().requires_grad_()
        exact_out = sparse_delta_linear_ref(x, self.base.weight.double(), self.base.bias.double(), values, self.indices)
        exact_out.backward(dy)
        exact_grad = values.grad
        for impl in impls:
            if impl in GRAD_IMPLS:
                common.check_close(f"{impl} values' gradient", self.grad_only(impl), exact_grad, dtype)
        for impl in impls[1:]:
            self.clear_grads()
            common.check_close(f"{impl} step's values' gradient", self.fwd_bwd(impl), exact_grad, dtype)
        self.clear_grads()
        out = self.forward("fastpeft")
        out.backward(self.dy)
        common.check_close("fastpeft output", out, exact_out, dtype)
        common.check_close("fastpeft dx", self.x.grad, x.grad, dtype)
        self.clear_grads()


def trainable_state_bytes(nnz: int, numel: int, weight_dtype: torch.dtype) -> tuple[int, int]:
    """(fastpeft's fixed-mask state, the dense diff's): see the module docstring."""
    per_nonzero = ADAM_FP32_BYTES + index_dtype(numel).itemsize + weight_dtype.itemsize
    return nnz * per_nonzero, numel * ADAM_FP32_BYTES


def ratios(results: dict, state: tuple[int, int]) -> dict:
    def speedup(impl: str):
        return results[impl]["grad_ms"] / results["fastpeft_sddmm"]["grad_ms"] if impl in results else None

    measured = {
        "sddmm_speedup_over_dense": speedup("dense"),
        "sddmm_speedup_over_torch_sampled": speedup("torch_sampled"),
        "fastpeft/base": results["fastpeft"]["fwd_bwd_ms"] / results["base"]["fwd_bwd_ms"],
        "trainable_state/dense_diff": state[0] / state[1],
    }
    met = {f"target_met:{name}": None if value is None else
           (value >= TARGETS[name] if "speedup" in name else value <= TARGETS[name])
           for name, value in measured.items()}
    return {**measured, **met, "fastpeft/base_fwd": results["fastpeft"]["fwd_ms"] / results["base"]["fwd_ms"],
            "dense/fastpeft": results["dense"]["fwd_bwd_ms"] / results["fastpeft"]["fwd_bwd_ms"],
            "trainable_state_bytes": state[0], "dense_diff_state_bytes": state[1]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = common.setup(args)
    problem = Problem(args.shape, args.density, args.backend, device, dtype)
    unsupported = problem.unsupported()
    impls = tuple(impl for impl in IMPLS if impl not in unsupported)
    problem.check(dtype, impls)
    results = common.measure(problem, impls, device, args.repeats, args.warmup)
    grad_ms = common.time_round_robin({impl: functools.partial(problem.grad_only, impl) for impl in GRAD_IMPLS
                                       if impl in impls}, device, args.repeats, args.warmup)
    for impl, result in results.items():
        result["grad_ms"] = grad_ms.get(impl)
    weight = problem.base.weight
    nnz = problem.indices.numel()
    params = {"density": args.density, "nnz": nnz, "index_dtype": str(problem.indices.dtype).removeprefix("torch."),
              "backend": backends.choose(device, args.backend), "unsupported": unsupported}
    state = trainable_state_bytes(nnz, weight.numel(), weight.dtype)
    report = common.make_report("sparse_delta", args, args.shape, params, results, ratios(results, state))
    return common.finish(report, args)


if __name__ == "__main__":
    main()
