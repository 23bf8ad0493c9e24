"""Machinery shared by the benchmark scripts: common flags, timing, saved-activation bytes, JSON, table, plot.

Timing: one sample times one call. The cases run round-robin, each round starting one case later than the last,
so that drift in machine load (and whatever one case leaves in the caches) falls on all of them alike; a case's
time is the median of its samples after `--warmup` untimed rounds. CPU samples use `time.perf_counter`; CUDA
samples are CUDA-event times, the device synchronised before and after each call. What a call returns is
released after the clock stops, so freeing the autograd graph is not timed.
On a shared CPU, `--threads 1` avoids OpenMP threads waiting on each other behind other processes' work.

Heap: `setup` keeps the memory a step frees in the process (fastpeft.heap; `--trimmed-heap` leaves glibc's default,
under which every step faults its activations' pages in again), for every implementation of the run alike.

Memory: `saved_bytes` counts the tensors a forward saves for backward (`torch.autograd.graph.saved_tensors_hooks`),
each storage once; on CUDA `peak_bytes` adds the growth of `torch.cuda.max_memory_allocated` over a call.

Output: `--json PATH` and `--plot PATH` take a file, or a directory (existing, or written with a trailing `/`) in
which the file is named `<op>-<device>-<date>.json` / `.png`, the naming of the committed `bench/results/`.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Hashable, Iterable

import torch

from fastpeft.heap import keep_freed_heap

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Largest max|got - exact| / max|exact| accepted by `check_close`: a sanity check that the implementations
# compute the same function, not the numerics test (that one lives in tests/).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark script accepts."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median taken); default 30")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first; default 3")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--trimmed-heap", action="store_true",
                        help="leave glibc's malloc giving freed memory back to the kernel (its default): every step "
                             "faults its pages in again (default: fastpeft.heap.keep_freed_heap, for every "
                             "implementation alike, as fastpeft's training loop does)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (file or directory)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (file or directory)")


def parse_sizes(text: str, names: Iterable[str]) -> dict[str, int]:
    """'4096,768,768' -> {'M': 4096, 'K': 768, 'N': 768} for names 'MKN'."""
    names = list(names)
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != len(names) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected {len(names)} positive integers {','.join(names)}, got {text!r}")
    return dict(zip(names, sizes))


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply the common flags: thread count and seed; return the device and dtype to benchmark."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.heap_kept = not args.trimmed_heap and keep_freed_heap()
    torch.manual_seed(args.seed)
    return torch.device(args.device), DTYPES[args.dtype]


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn`."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        result = fn()
        stop.record()
        torch.cuda.synchronize(device)
        del result
        return start.elapsed_time(stop)
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed * 1e3


def time_round_robin(cases: dict[Hashable, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                     prepare: Callable[[], None] | None = None) -> dict[Hashable, float]:
    """Median milliseconds per case; `prepare` (untimed) runs before every call, e.g. to clear gradients."""
    samples = round_robin_samples(cases, device, repeats, warmup, prepare)
    return {name: statistics.median(times) for name, times in samples.items()}


def round_robin_samples(cases: dict[Hashable, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                        prepare: Callable[[], None] | None = None) -> dict[Hashable, list[float]]:
    """The `repeats` timed milliseconds of each case, in round order (see the module docstring)."""
    names = list(cases)
    samples: dict[Hashable, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            if prepare is not None:
                prepare()
            elapsed = _time_call(cases[name], device)
            if round_ >= warmup:
                samples[name].append(elapsed)
    return samples


def saved_bytes(forward: Callable[[], object], alive: Iterable[torch.Tensor | None]) -> tuple[int, int]:
    """(extra, all): bytes of the distinct storages that `forward` saves for backward. `extra` leaves out the
    storages of `alive` (the layer's inputs and parameters, which are held anyway), so it is the activation
    memory that the layer itself keeps until backward."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    del result
    held = {t.untyped_storage().data_ptr() for t in alive if t is not None}
    return sum(n for ptr, n in saved.items() if ptr not in held), sum(saved.values())


def peak_bytes(fn: Callable[[], object], device: torch.device, prepare: Callable[[], None] | None = None) -> int | None:
    """Growth of CUDA's peak allocated memory over one call of `fn`; None off CUDA."""
    if device.type != "cuda":
        return None
    if prepare is not None:
        prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


@torch.no_grad()
def check_close(name: str, got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise unless `got` matches `exact` (computed in float64) to the dtype's relative tolerance."""
    scale = exact.abs().max().item() or 1.0
    error = (got.double() - exact.double()).abs().max().item() / scale
    if not error <= RELATIVE_TOLERANCE[dtype]:
        raise RuntimeError(f"{name} disagrees with the float64 reference: relative max error {error:.3g} "
                           f"> {RELATIVE_TOLERANCE[dtype]:g} ({dtype})")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_report(op: str, args: argparse.Namespace, shape: dict, params: dict, results: dict, ratios: dict) -> dict:
    """The JSON layout of DESIGN.md "Benchmarks"; `params` gains repeats, warmup and threads."""
    device = torch.device(args.device)
    return {
        "op": op, "device": args.device, "device_name": device_name(device), "dtype": args.dtype, "shape": shape,
        "params": {**params, "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
                   "heap_kept": args.heap_kept},
        "torch": torch.__version__, "triton": package_version("triton"), "results": results, "ratios": ratios,
    }


def output_path(path: str, report: dict, suffix: str) -> Path:
    """`path` itself, or `<path>/<op>-<device>-<date><suffix>` when it names a directory."""
    target = Path(path)
    if path.endswith("/") or target.is_dir():
        target = target / f"{report['op']}-{report['device']}-{datetime.date.today().isoformat()}{suffix}"
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# Per-implementation times beyond fwd / fwd+bwd that a script may report (None where they do not apply).
EXTRA_TIMES = {"grad_ms": "values' gradient"}


def _extra_times(report: dict) -> list[str]:
    return [key for key in EXTRA_TIMES if any(r.get(key) is not None for r in report["results"].values())]


def markdown_table(report: dict, baseline: str = "base") -> str:
    """impl | fwd ms | fwd+bwd ms | [extra times] | saved MB | x base (fwd+bwd time over the baseline's)."""
    base = report["results"][baseline]["fwd_bwd_ms"]
    extra = _extra_times(report)
    lines = ["| impl | fwd ms | fwd+bwd ms | " + "".join(f"{EXTRA_TIMES[k]} ms | " for k in extra)
             + "saved MB | x base |", "|---|---:|---:|" + "---:|" * len(extra) + "---:|---:|"]
    for impl, r in report["results"].items():
        cells = "".join("- | " if r.get(k) is None else f"{r[k]:.3f} | " for k in extra)
        lines.append(f"| {impl} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {cells}{r['saved_bytes'] / 1e6:.3f} "
                     f"| {r['fwd_bwd_ms'] / base:.2f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path, step_label: str = "fwd+bwd") -> None:
    """Grouped bars of fwd, fwd+bwd (`step_label` in the legend) and any extra milliseconds per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(report["results"])
    fig, ax = plt.subplots(figsize=(1.6 * len(impls) + 2, 4))
    series = [("fwd_ms", "fwd"), ("fwd_bwd_ms", step_label)] + [(k, EXTRA_TIMES[k]) for k in _extra_times(report)]
    width = 0.8 / len(series)
    for n, (key, label) in enumerate(series):
        ax.bar([i + (n + 0.5) * width - 0.4 for i in range(len(impls))],
               [report["results"][i].get(key) or 0.0 for i in impls], width, label=label)
    ax.set_xticks(range(len(impls)), impls)
    ax.set_ylabel("ms (median)")
    shape = ", ".join(f"{k}={v}" for k, v in report["shape"].items())
    ax.set_title(f"{report['op']} {report['device']} {report['dtype']} {shape}\n{report['device_name']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(problem, impls, device: torch.device, repeats: int, warmup: int) -> dict:
    """Times, saved bytes and peak memory of each implementation of `problem` (forward, fwd_bwd, alive, clear_grads)."""
    cases = {}
    for impl in impls:
        cases[impl, "fwd"] = functools.partial(problem.forward, impl)
        cases[impl, "fwd_bwd"] = functools.partial(problem.fwd_bwd, impl)
    times = time_round_robin(cases, device, repeats, warmup, prepare=problem.clear_grads)
    results = {}
    for impl in impls:
        extra, everything = saved_bytes(functools.partial(problem.forward, impl), problem.alive)
        results[impl] = {
            "fwd_ms": times[impl, "fwd"], "fwd_bwd_ms": times[impl, "fwd_bwd"], "saved_bytes": extra,
            "peak_bytes": peak_bytes(functools.partial(problem.fwd_bwd, impl), device, problem.clear_grads),
            "saved_bytes_all": everything,
        }
    return results


def finish(report: dict, args: argparse.Namespace, baseline: str = "base",
           table: Callable[[dict], str] | None = None, step_label: str = "fwd+bwd") -> dict:
    """Print the table (`table(report)`, by default markdown_table with times over `baseline`'s) and the ratios,
    then write the JSON and plot (fwd_bwd_ms named `step_label`) that were asked for."""
    print(table(report) if table else markdown_table(report, baseline))
    print()
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    if args.json:
        target = output_path(args.json, report, ".json")
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {target}")
    if args.plot:
        target = output_path(args.plot, report, ".png")
        plot(report, target, step_label)
        print(f"wrote {target}")
    return report
