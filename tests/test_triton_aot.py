"""Ahead-of-time compile of every Triton kernel in `kernels/` for the H100 (sm_90) and the A100 (sm_80), no GPU.

The interpreter accepts kernels that the GPU compiler rejects (a dot dimension below 16, too much shared
memory, ...), so every registered kernel (`KERNELS` in each `kernels/` module) is built for each of its autotune
configs and each dtype, down to the cubin, and the test checks what the GPU would: it compiles, its shared
memory fits the target, and the bf16 / fp16 GEMMs use Hopper's wgmma tensor-core instructions on sm_90.

`tests/conftest.py` sets TRITON_INTERPRET=1 before Triton is imported, which turns every `@triton.jit` in this
process into an interpreted function that cannot be compiled; so the builds run in a child process started
without that variable (this file run as a script), spread over the CPU cores, and report back as JSON.
"""
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Shared memory one block may use: sm_90 227 KB, sm_80 163 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ child process
def _kernel_modules():
    import fastpeft.kernels

    return [importlib.import_module(f"fastpeft.kernels.{info.name}")
            for info in pkgutil.iter_modules(fastpeft.kernels.__path__)]


def _registry():
    specs = {}
    for module in _kernel_modules():
        for spec in getattr(module, "KERNELS", []):
            specs[spec.name] = spec
    return specs


def _unregistered_kernels(specs):
    """Names of `*_kernel` jit functions in kernels/ that no KERNELS entry covers."""
    from triton.runtime.jit import JITFunction

    registered = {id(spec.fn) for spec in specs.values()}
    return sorted(f"{module.__name__}.{name}" for module in _kernel_modules() for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel") and id(obj) not in registered)


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, dtype_name, config_index, arch = job
    spec = _SPECS[name]
    dtype = DTYPES[dtype_name]
    config = spec.configs_for(dtype)[config_index]
    signature, constexprs = spec.signature(dtype, config)
    start = time.perf_counter()
    result = {"kernel": name, "dtype": dtype_name, "arch": arch, "config": str(config.kwargs),
              "num_warps": config.num_warps, "num_stages": config.num_stages}
    try:
        compiled = triton.compile(ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # reported, and failed, by the parent
        return {**result, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {**result, "seconds": time.perf_counter() - start, "shared": compiled.metadata.shared,
            "gemm": spec.gemm, "wgmma": "wgmma" in ptx, "cubin": len(compiled.asm["cubin"]),
            "signed_shift": "shr.s32" in ptx, "unsigned_shift": "shr.u32" in ptx}


def _child_main():
    global _SPECS
    _SPECS = _registry()
    jobs = [(spec.name, dtype_name, i, arch) for spec in _SPECS.values() for dtype_name, dtype in DTYPES.items()
            if dtype in spec.dtypes for i in range(len(spec.configs_for(dtype))) for arch in SMEM_LIMIT]
    start = time.perf_counter()
    # fork: the children inherit the imported registry; no CUDA is ever initialised here.
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile, jobs))
    json.dump({"results": results, "unregistered": _unregistered_kernels(_SPECS),
               "wall_seconds": time.perf_counter() - start}, sys.stdout)


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout)
    builds = [r for r in report["results"] if "error" not in r]
    print(f"\nAOT: {len(builds)} builds in {report['wall_seconds']:.1f} s wall, "
          f"{sum(r['seconds'] for r in builds):.1f} s of compile time")
    return report


def test_every_kernel_is_registered(aot):
    assert aot["results"], "no kernels found in kernels/"
    assert aot["unregistered"] == [], "jit kernels missing from a KERNELS registry"


def test_every_config_compiles_and_fits_shared_memory(aot):
    failures = [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']}: {r['error']}"
                for r in aot["results"] if "error" in r]
    failures += [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['config']} warps={r['num_warps']} "
                 f"stages={r['num_stages']}: {r['shared']} B shared > {SMEM_LIMIT[r['arch']]}"
                 for r in aot["results"] if "error" not in r and r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not failures, "\n".join(failures)
    assert all(r["cubin"] > 0 for r in aot["results"])


def test_low_precision_gemms_use_wgmma_on_sm90(aot):
    gemms = [r for r in aot["results"] if r["gemm"] and r["arch"] == 90 and r["dtype"] in ("bf16", "fp16")]
    assert gemms
    assert [f"{r['kernel']} {r['dtype']} {r['config']}" for r in gemms if not r["wgmma"]] == []


def test_dropout_hash_uses_unsigned_arithmetic(aot):
    """mix32 needs logical (unsigned) right shifts; a signed shift would change the bits on the GPU only."""
    builds = [r for r in aot["results"] if r["kernel"] == "dropout_hash"]
    assert builds and all(r["unsigned_shift"] and not r["signed_shift"] for r in builds)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
def test_dropout_hash_matches_reference(seed):
    """The Triton hash (by the interpreter on CPU, or on the GPU) is bit-identical to fastpeft.ops.dropout's."""
    pytest.importorskip("triton")
    from fastpeft.kernels.dropout import dropout_hash_grid
    from fastpeft.ops.dropout import dropout_hash

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton without the interpreter needs a CUDA device")
    assert torch.equal(dropout_hash_grid(seed, 37, 70, device).cpu(), dropout_hash(seed, 37, 70))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9, 1 - 2**-30])
def test_launcher_threshold_matches_reference(p):
    pytest.importorskip("triton")
    from fastpeft.kernels.dropout import dropout_args
    from fastpeft.ops.dropout import keep_threshold

    assert dropout_args(p, 7) == (7, keep_threshold(p), 1.0 / (1.0 - p), True)


if __name__ == "__main__":
    _child_main()
