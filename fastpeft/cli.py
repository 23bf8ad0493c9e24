"""The `fastpeft` command.

  fastpeft demo    LoRA-fine-tune the packaged all-MiniLM-L6-v2 on the packaged sentiment data, compare with
                   HF PEFT, save, reload, merge and check (no arguments needed, nothing downloaded)
  fastpeft train   the same on your own local model directory and .csv / .jsonl data
  --method adapter in either: bottleneck adapters instead of LoRA (no PEFT comparison, no merge: a reload check)
  --method diff    in either: diff pruning: an L0-penalised search (--search-epochs), projection to a fixed sparse
                   mask (--density), then training of the kept values (--epochs); unmerge / merge / reload checks
"""
import argparse
from pathlib import Path

import torch
import transformers

from fastpeft import demo
from fastpeft.datasets import load_splits
from fastpeft.model import AdapterConfig, DiffPruningConfig, LoraConfig
from fastpeft.model.adapter_config import PLACEMENTS
from fastpeft.model.config import SEQ_CLS_HEADS

CLASSIFIER_HEADS = list(SEQ_CLS_HEADS)  # trained (new) and saved beside any method's adapter
METHODS = ("lora", "adapter", "diff")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def density(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def device(text: str) -> str:
    try:
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError) as e:
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable here: {e}") from None
    return text


def target_modules(text: str) -> list[str] | str:
    """A comma-separated list of module names, or "all-linear"."""
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    defaults = argparse.ArgumentDefaultsHelpFormatter
    run_demo = commands.add_parser("demo", help="fine-tune the packaged MiniLM on the packaged sentiment data",
                                   formatter_class=defaults)
    run_demo.add_argument("--epochs", type=positive_int, default=2, help="passes over the training data")
    run_demo.add_argument("--r", type=positive_int, default=8, help="LoRA rank (lora_alpha = 2 r)")
    run_demo.add_argument("--output-dir", type=Path, default=Path("fastpeft-demo"), help="where the adapter is saved")
    run_demo.add_argument("--seed", type=int, default=0, help="seed of the head, LoRA init, dropout, shuffling")
    run_demo.add_argument("--device", type=device, default="cpu", help="torch device")
    run_demo.add_argument("--method", choices=METHODS, default="lora",
                          help="LoRA, bottleneck adapters or diff pruning")
    add_diff_arguments(run_demo, demo.DIFF_DEMO["density"])

    train = commands.add_parser("train", help="LoRA-fine-tune a local model on a local labelled .csv / .jsonl file",
                                formatter_class=defaults)
    train.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    train.add_argument("--data", type=Path, required=True, help="training data, .csv (with a header) or .jsonl")
    train.add_argument("--test-data", type=Path, help="test data (default: a stratified --test-fraction of --data)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held out when there is no --test-data")
    train.add_argument("--text-column", default="text", help="column (or JSON key) of the text")
    train.add_argument("--label-column", default="label", help="column (or JSON key) of the label name")
    train.add_argument("--output-dir", type=Path, required=True, help="where the adapter is saved")
    train.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data")
    train.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    train.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scaling numerator (scaling = alpha / r)")
    train.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input")
    train.add_argument("--lr", type=positive_float, default=2e-3,
                       help="peak AdamW learning rate (linear warm-up, then decay)")
    train.add_argument("--batch-size", type=positive_int, default=16, help="examples per training step")
    train.add_argument("--max-length", type=positive_int, default=128, help="tokens kept per text")
    train.add_argument("--seed", type=int, default=0, help="seed of the head, LoRA init, dropout, shuffling, split")
    train.add_argument("--device", type=device, default="cpu", help="torch device")
    train.add_argument("--target-modules", type=target_modules, default="all-linear",
                       help='comma-separated module names (e.g. "query,value") or "all-linear"')
    train.add_argument("--method", choices=METHODS, default="lora", help="LoRA, bottleneck adapters or diff pruning")
    train.add_argument("--placement", choices=PLACEMENTS, default="houlsby",
                       help="where bottleneck adapters go (--method adapter)")
    train.add_argument("--bottleneck", type=positive_int, default=32,
                       help="bottleneck adapter width (--method adapter)")
    add_diff_arguments(train, DiffPruningConfig.density)
    return parser


def add_diff_arguments(parser: argparse.ArgumentParser, default_density: float) -> None:
    parser.add_argument("--search-epochs", type=positive_int, default=1,
                        help="epochs of the L0-penalised search before the mask is fixed (--method diff)")
    parser.add_argument("--density", type=density, default=default_density,
                        help="fraction of each targeted weight's entries kept (--method diff)")


def train_config(args, parser: argparse.ArgumentParser) -> demo.RunConfig:
    """The run `fastpeft train` asked for; bad input is an argparse error (exit status 2)."""
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a Hugging Face model directory (it has no config.json)")
    try:
        if args.method == "adapter":
            lora = AdapterConfig(placement=args.placement, bottleneck=args.bottleneck, dropout=0.1,
                                 modules_to_save=CLASSIFIER_HEADS)
        elif args.method == "diff":
            lora = DiffPruningConfig(target_modules=args.target_modules, density=args.density,
                                     modules_to_save=CLASSIFIER_HEADS)
        else:
            lora = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              target_modules=args.target_modules, modules_to_save=CLASSIFIER_HEADS)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return demo.RunConfig(args.model, args.output_dir, lora, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, device=args.device,
                          require_improvement=False, search_epochs=args.search_epochs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()  # no load reports about the new, untrained head
    transformers.logging.disable_progress_bar()
    if args.command == "demo":
        failures = demo.run_demo(epochs=args.epochs, r=args.r, output_dir=args.output_dir, seed=args.seed,
                                 device=args.device, method=args.method, search_epochs=args.search_epochs,
                                 density=args.density)
    else:
        cfg = train_config(args, parser)
        try:
            train, test = load_splits(args.data, args.test_data, args.text_column, args.label_column,
                                      args.test_fraction, args.seed)
        except ValueError as e:  # DatasetError, or a --test-fraction outside (0, 1)
            parser.error(str(e))
        try:
            failures = demo.run(cfg, train, test)
        except demo.SetupError as e:  # e.g. --target-modules or --method that do not fit --model
            parser.error(str(e))
    if failures:
        raise SystemExit(1)
    return 0
