"""Ahead-of-time builds of every Triton kernel variant the launchers produce, for the H100 (sm_90) and the A100
(sm_80), with no GPU; the checks are those a GPU would fail on.

The interpreter accepts kernels that the GPU compiler rejects, or builds badly, so each kernels/ family's
`aot_launch` runs its launchers on contiguous, 16-aligned CPU tensors over its `AOT_DIMENSIONS` (dtype, padded
rank or width, dropout, biases, activation, ...), kernels/aot.py records each launch with every autotune config
and builds it exactly as a launch on such GPU tensors would (Triton's specialisation: alignment, divisibility by
16, unit strides as constants), and the tests check each build: its shared memory fits the target, ptxas spills no
registers, and the bf16 / fp16 tensor-core loops issue Hopper's `wgmma` inside the loop on sm_90.

CI builds a covering set: every value of every dimension (each dtype x autotune config x architecture always),
the other dimensions at their worst case; `python tests/test_triton_aot.py --every` builds the full cross product
(before a GPU run; much longer). The builds run in a child process on two worker processes and report as JSON.
"""
import concurrent.futures
import importlib
import json
import multiprocessing
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use: sm_90 227 KB, sm_80 163 KB
WORKERS = 2
# Builds that spill registers, found by this test and not fixed yet: (kernel, dtype, arch) -> the worst case's spill
# stores (bytes) when found: the exact fp32 dots (FMA code that holds its operand fragments in registers), and two
# bf16 / fp16 builds for sm_80 that are not the worst case one would guess (dx without dropout; the adapter's
# backward with relu / silu, not gelu). Any other spill fails the test, and so does an entry here that no longer
# spills, so the list only shrinks.
KNOWN_SPILLS = {
    ("_lora_forward_kernel", "fp32", 80): 2336, ("_lora_forward_kernel", "fp32", 90): 2540,
    ("_lora_forward_small_kernel", "fp32", 80): 876, ("_lora_forward_small_kernel", "fp32", 90): 1000,
    ("_lora_backward_shrink_kernel", "fp32", 80): 6480, ("_lora_backward_shrink_kernel", "fp32", 90): 7796,
    ("_lora_backward_dx_kernel", "fp32", 80): 276, ("_lora_backward_dx_kernel", "fp32", 90): 24,
    ("_lora_backward_dx_kernel", "bf16", 80): 184, ("_adapter_backward_up_kernel", "bf16", 80): 4,
    ("_adapter_backward_down_kernel", "fp32", 80): 484, ("_adapter_backward_down_kernel", "fp32", 90): 316,
}


# ------------------------------------------------------------------------------------------------ child process
def _kernel_modules():
    import fastpeft.kernels

    return [importlib.import_module(f"fastpeft.kernels.{info.name}")
            for info in pkgutil.iter_modules(fastpeft.kernels.__path__)]


def _record(every: bool):
    """Every launch of every family's `aot_launch` over its dimensions, and the kernels no launch reached."""
    from fastpeft.kernels.aot import combinations, module_kernels, recording

    modules = _kernel_modules()
    families = [module for module in modules if hasattr(module, "aot_launch")]
    with recording(modules) as launches:
        for family in families:
            for dimensions in combinations(family.AOT_DIMENSIONS, every):
                family.aot_launch(**dimensions)
    reached = {id(launch.kernel) for launch in launches}
    unreached = [f"{m.__name__}.{k.fn.__name__}" for m in modules for k in module_kernels(m) if id(k) not in reached]
    return launches, unreached


def _wgmma_condition(kernel):
    """None when the kernel has no tensor-core main loop, else the constexpr it needs one for ("" for none)."""
    module = sys.modules[kernel.fn.__module__]
    return getattr(module, "WGMMA_LOOPS", {}).get(kernel.fn.__name__)


def _build(job):
    from fastpeft.kernels.aot import build
    from fastpeft.kernels.ptx_checks import in_a_loop, ptxas_usage

    launch, arch = _JOBS[job]
    src, _, options = launch.compile_inputs(arch)
    pointers = [t for t in src.signature.values() if isinstance(t, str) and t.startswith("*")]
    names = launch.kernel.arg_names
    constants = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
    result = {"kernel": launch.kernel.fn.__name__, "arch": arch, "dtype": pointers[0][1:],
              "variant": {k: v for k, v in sorted(constants.items()) if isinstance(v, (int, str, bool))},
              "num_warps": options["num_warps"], "num_stages": options["num_stages"]}
    condition = _wgmma_condition(launch.kernel)
    result["tensor_core_loop"] = condition is not None and (condition == "" or bool(constants.get(condition)))
    start = time.perf_counter()
    try:
        compiled = build(launch, arch)
    except Exception as exc:  # reported, and failed, by the parent
        return {**result, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {**result, "seconds": time.perf_counter() - start, "shared": compiled.metadata.shared,
            "cubin": len(compiled.asm["cubin"]), **ptxas_usage(compiled, arch),
            "wgmma_in_loop": in_a_loop(ptx, "wgmma.mma_async"), "wgmma_anywhere": "wgmma.mma_async" in ptx,
            "signed_shift": "shr.s32" in ptx, "unsigned_shift": "shr.u32" in ptx}


def _child_main(every: bool):
    global _JOBS
    start = time.perf_counter()
    launches, unreached = _record(every)
    unique = {}
    for launch in launches:
        for arch in SMEM_LIMIT:
            unique.setdefault(launch.key(arch), (launch, arch))
    _JOBS = list(unique.values())
    # fork: the workers inherit the recorded launches; no CUDA is initialised in this process.
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_build, range(len(_JOBS))))
    json.dump({"results": results, "unreached": unreached, "launches": len(launches),
               "wall_seconds": time.perf_counter() - start}, sys.stdout)


# ------------------------------------------------------------------------------------------------ tests
def _describe(r):
    return f"{r['kernel']} {r['dtype']} sm_{r['arch']} warps={r['num_warps']} stages={r['num_stages']} {r['variant']}"


@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout)
    builds = [r for r in report["results"] if "error" not in r]
    print(f"\nAOT: {report['launches']} launches recorded, {len(report['results'])} distinct builds in "
          f"{report['wall_seconds']:.1f} s wall, {sum(r['seconds'] for r in builds):.1f} s of compile time")
    return report


def compile_failures(results):
    return [f"{_describe(r)}: {r['error']}" for r in results if "error" in r]


def shared_memory_failures(results):
    return [f"{_describe(r)}: {r['shared']} B shared > {SMEM_LIMIT[r['arch']]}"
            for r in results if "error" not in r and r["shared"] > SMEM_LIMIT[r["arch"]]]


def spill_failures(results):
    return [f"{_describe(r)}: {r['registers']} registers, spills {r['spill_stores']} B stores / "
            f"{r['spill_loads']} B loads"
            for r in results if "error" not in r and (r["spill_stores"] or r["spill_loads"])]


def wgmma_failures(results):
    """bf16 / fp16 sm_90 builds of a tensor-core loop that do not issue wgmma inside a loop."""
    return [_describe(r) for r in results if "error" not in r and r["arch"] == 90 and r["dtype"] in ("bf16", "fp16")
            and r["tensor_core_loop"] and not r["wgmma_in_loop"]]


def test_every_kernel_is_launched(aot):
    assert aot["results"], "no kernels found in kernels/"
    assert aot["unreached"] == [], "jit kernels that no family's aot_launch reaches"


def test_every_build_compiles_and_fits_shared_memory(aot):
    failures = compile_failures(aot["results"]) + shared_memory_failures(aot["results"])
    assert not failures, "\n".join(failures)
    assert all(r["cubin"] > 0 for r in aot["results"])


def test_no_build_spills_registers_but_the_known_ones(aot):
    spilling = [r for r in aot["results"] if "error" not in r and (r["spill_stores"] or r["spill_loads"])]
    new = spill_failures([r for r in spilling if (r["kernel"], r["dtype"], r["arch"]) not in KNOWN_SPILLS])
    assert not new, "\n".join(new)
    fixed = set(KNOWN_SPILLS) - {(r["kernel"], r["dtype"], r["arch"]) for r in spilling}
    assert not fixed, f"no longer spill, drop from KNOWN_SPILLS: {sorted(fixed)}"


def test_low_precision_tensor_core_loops_use_wgmma_on_sm90(aot):
    assert any(r["tensor_core_loop"] for r in aot["results"])
    failures = wgmma_failures(aot["results"])
    assert not failures, "\n".join(failures)


def test_dropout_hash_uses_unsigned_arithmetic(aot):
    """mix32 needs logical (unsigned) right shifts; a signed shift would change the bits on the GPU only."""
    builds = [r for r in aot["results"] if r["kernel"] == "dropout_hash_kernel"]
    assert builds and all(r["unsigned_shift"] and not r["signed_shift"] for r in builds)


if __name__ == "__main__":
    _child_main(every="--every" in sys.argv)
