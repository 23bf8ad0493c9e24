"""`fastpeft compare`: every registered method that trains a sequence classifier on its own, trained the same way
(the same model, data, epochs, batches and seed; each run is the method's `fastpeft demo` run, at its demo learning
rate, from a freshly seeded model) and measured, not quoted: trainable
parameters, median ms per training step, saved activation bytes, the trained state's memory, test accuracy and the
saved adapter's file size. Printed as a markdown table, written as JSON and as a plot of accuracy against trainable
share (marker size: step time).

Methods run one after another, so a change in the machine's load between them moves their step times; the state
memory is computed (trainable parameters, their gradients and AdamW's two moments, fp32), on CUDA the peak allocated
memory is measured as well."""
import datetime
import json
import os
import time
from pathlib import Path

import torch
import transformers

from fastpeft import methods, training
from fastpeft.api import inject, save_adapter, trainable_parameters
from fastpeft.datasets import LabelledText
from fastpeft.demo import DEMO_HEADS
from fastpeft.methods.files import CONFIG_NAME, WEIGHTS_NAME

COLUMNS = ("method", "trainable", "trainable %", "ms / step", "saved act. MB", "grads MB", "state MB", "peak MB",
           "accuracy", "file KB")


def run(model_dir: Path, train: LabelledText, test: LabelledText, output_dir: Path, epochs: int = 2,
        batch_size: int = 16, max_length: int = 64, seed: int = 0, device: str = "cpu", names: list[str] | None = None,
        log=print) -> dict:
    """Train and measure each method in `names` (default: every registered one); returns the report (also written
    to `output_dir`/compare.json, with compare.png and each method's saved adapter)."""
    def fresh_model():  # as `fastpeft demo` starts: the seed, then the model with its new head
        transformers.set_seed(seed)
        return training.load_classifier(model_dir, train.label_names, device)

    base, tokenizer = fresh_model()
    train_enc = training.EncodedText(tokenizer, train, max_length)
    test_enc = training.EncodedText(tokenizer, test, max_length)
    first_batch = train_enc.batches(batch_size)[0].to(device)
    rows, skipped = [], {}
    untrained, _ = training.evaluate(base, test_enc, device=device)
    del base
    for name in names or methods.names():
        method = methods.named(name)
        options = {flag[2:].replace("-", "_"): value for flag, value in method.demo_options.items()}
        try:
            config = method.cli_config(options, DEMO_HEADS, demo=True)
        except (TypeError, ValueError, NotImplementedError) as e:
            skipped[name] = str(e) or "it does not train a sequence classifier on its own"
            log(f"{name}: skipped ({skipped[name]})")
            continue
        rows.append(_measure(name, method, config, fresh_model()[0], train_enc, test_enc, first_batch,
                             output_dir / name, epochs, batch_size, seed, device, options, log))
    report = {"op": "compare", "device": device, "model": str(model_dir), "train_examples": len(train),
              "test_examples": len(test), "epochs": epochs, "batch_size": batch_size, "seed": seed,
              "untrained_head_accuracy": untrained, "torch": torch.__version__, "rows": rows, "skipped": skipped,
              "date": datetime.date.today().isoformat()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output_dir / "compare.png")
    log(markdown_table(report))
    return report


def _measure(name, method, config, model, train_enc, test_enc, first_batch, adapter_dir: Path, epochs: int,
             batch_size: int, seed: int, device: str, options: dict, log) -> dict:
    inject(model, config)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    method.before_training(model, config, lambda n, **kwargs: training.train(
        model, train_enc, n, method.demo_lr, batch_size, seed=seed, device=device, progress=False, **kwargs),
        options, lambda line: None)
    trainable, total = trainable_parameters(model)  # what the measured training trains (after a search stage)
    start = time.perf_counter()
    result = training.train(model, train_enc, epochs, method.demo_lr, batch_size, seed=seed, device=device,
                            desc=name)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    accuracy, _ = training.evaluate(model, test_enc, device=device)
    saved = training.saved_activation_bytes(model, first_batch)
    grads = gradient_bytes(model, first_batch)
    save_adapter(model, adapter_dir)
    file_bytes = sum(os.path.getsize(adapter_dir / f) for f in (CONFIG_NAME, WEIGHTS_NAME))
    row = {"method": name, "label": method.label, "describe": method.describe(config), "trainable": trainable,
           "total": total, "trainable_pct": 100 * trainable / total, "step_ms": result.median_step_ms(),
           "train_seconds": seconds, "saved_activation_bytes": saved, "gradient_bytes": grads,
           "state_bytes": 4 * 4 * trainable,
           "peak_bytes": peak, "accuracy": accuracy, "first_loss": result.losses[0], "last_loss": result.losses[-1],
           "file_bytes": file_bytes}
    log(f"{name}: accuracy {accuracy:.1%}, {row['step_ms']:.1f} ms/step, {trainable:,} trainable")
    return row


def gradient_bytes(model, batch) -> int:
    """Bytes of the gradients one backward computes: the parameters that train, nothing of the frozen weights (BitFit
    computes no weight gradient at all)."""
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch).loss.backward()
    found = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return found


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in report["rows"]:
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r["peak_bytes"] is not None else "–"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.3f} | {r['step_ms']:.1f} | "
                     f"{r['saved_activation_bytes'] / 2**20:.1f} | {r['gradient_bytes'] / 2**20:.2f} | "
                     f"{r['state_bytes'] / 2**20:.2f} | {peak} | "
                     f"{r['accuracy']:.1%} | {r['file_bytes'] / 2**10:.0f} |")
    lines.append(f"\nuntrained head: {report['untrained_head_accuracy']:.1%} test accuracy; "
                 f"{report['train_examples']} train / {report['test_examples']} test examples, {report['epochs']} "
                 f"epochs, batch {report['batch_size']}, seed {report['seed']}, {report['device']}")
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Accuracy against trainable share (log scale), marker area by step time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = report["rows"]
    ax.scatter([r["trainable_pct"] for r in rows], [100 * r["accuracy"] for r in rows],
               s=[4 * r["step_ms"] for r in rows], alpha=0.5)
    for r in rows:
        ax.annotate(r["method"], (r["trainable_pct"], 100 * r["accuracy"]), fontsize=8, ha="center", va="bottom")
    ax.axhline(100 * report["untrained_head_accuracy"], color="grey", linestyle=":", label="untrained head")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, % of the model (log)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"fastpeft compare: {report['train_examples']} train / {report['test_examples']} test examples, "
                 f"{report['epochs']} epochs, {report['device']} (marker area: ms / step)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
