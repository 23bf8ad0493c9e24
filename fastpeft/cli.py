"""The `fastpeft` command.

  fastpeft demo    LoRA-fine-tune the packaged all-MiniLM-L6-v2 on the packaged sentiment data, compare with
                   HF PEFT, save, reload, merge and check (no arguments needed, nothing downloaded)
  fastpeft train   the same on your own local model directory and .csv / .jsonl data
  --method adapter in either: bottleneck adapters instead of LoRA (no PEFT comparison, no merge: a reload check)
  --method diff    in either: diff pruning: an L0-penalised search (--search-epochs), projection to a fixed sparse
                   mask (--density), then training of the kept values (--epochs); unmerge / merge / reload checks
"""
import argparse
import os
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
# The flags only some methods take, per command: flag -> (those methods, default). They are parsed with
# default=SUPPRESS, so one given with another --method is seen and refused instead of silently ignored.
METHOD_FLAGS = {
    "demo": {"--r": (("lora",), 8), "--search-epochs": (("diff",), 1),
             "--density": (("diff",), demo.DIFF_DEMO["density"])},
    "train": {"--r": (("lora",), 8), "--lora-alpha": (("lora",), 16.0), "--lora-dropout": (("lora",), 0.1),
              "--target-modules": (("lora", "diff"), "all-linear"), "--placement": (("adapter",), "houlsby"),
              "--bottleneck": (("adapter",), 32), "--search-epochs": (("diff",), 1),
              "--density": (("diff",), DiffPruningConfig.density)},
}


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
    """A device that can train: it exists here and holds data (meta allocates fine, then fails deep in a forward)."""
    try:
        if torch.device(text).type == "meta":
            raise argparse.ArgumentTypeError(f"device {text!r} cannot train: meta tensors hold no data")
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError) as e:
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable here: {e}") from None
    return text


def output_dir(text: str) -> Path:
    """A directory the adapter can be saved to, checked before any training: a writable directory, or a new path
    under one. The save writes a temporary folder beside it, so the folder above must be writable as well."""
    path = Path(os.path.realpath(text))  # as the save resolves it: a symlinked directory's target is written
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    writable = [path] if path.exists() else []
    above = next((folder for folder in path.parents if folder.exists()), path)  # "/" has no parents
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {above} is not a directory")
    for folder in [above, *writable]:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write to {folder} (no write permission)")
    return Path(text)


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
    method_flag(run_demo, "demo", "--r", type=positive_int, help="LoRA rank (lora_alpha = 2 r)")
    run_demo.add_argument("--output-dir", type=output_dir, default="fastpeft-demo", help="where the adapter is saved")
    run_demo.add_argument("--seed", type=int, default=0, help="seed of the head, LoRA init, dropout, shuffling")
    run_demo.add_argument("--device", type=device, default="cpu", help="torch device")
    run_demo.add_argument("--method", choices=METHODS, default="lora",
                          help="LoRA, bottleneck adapters or diff pruning")
    add_diff_arguments(run_demo, "demo")

    train = commands.add_parser("train", help="LoRA-fine-tune a local model on a local labelled .csv / .jsonl file",
                                formatter_class=defaults)
    train.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    train.add_argument("--data", type=Path, required=True, help="training data, .csv (with a header) or .jsonl")
    train.add_argument("--test-data", type=Path, help="test data (default: a stratified --test-fraction of --data)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held out when there is no --test-data")
    train.add_argument("--text-column", default="text", help="column (or JSON key) of the text")
    train.add_argument("--label-column", default="label", help="column (or JSON key) of the label name")
    train.add_argument("--output-dir", type=output_dir, required=True, help="where the adapter is saved")
    train.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data")
    method_flag(train, "train", "--r", type=positive_int, help="LoRA rank")
    method_flag(train, "train", "--lora-alpha", type=float, help="LoRA scaling numerator (scaling = alpha / r)")
    method_flag(train, "train", "--lora-dropout", type=float, help="dropout on the LoRA input")
    train.add_argument("--lr", type=positive_float, default=2e-3,
                       help="peak AdamW learning rate (linear warm-up, then decay)")
    train.add_argument("--batch-size", type=positive_int, default=16, help="examples per training step")
    train.add_argument("--max-length", type=positive_int, default=128, help="tokens kept per text")
    train.add_argument("--seed", type=int, default=0, help="seed of the head, LoRA init, dropout, shuffling, split")
    train.add_argument("--device", type=device, default="cpu", help="torch device")
    method_flag(train, "train", "--target-modules", type=target_modules,
                help='comma-separated module names (e.g. "query,value") or "all-linear"')
    train.add_argument("--method", choices=METHODS, default="lora", help="LoRA, bottleneck adapters or diff pruning")
    method_flag(train, "train", "--placement", choices=PLACEMENTS, help="where bottleneck adapters go")
    method_flag(train, "train", "--bottleneck", type=positive_int, help="bottleneck adapter width")
    add_diff_arguments(train, "train")
    return parser


def add_diff_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    method_flag(parser, command, "--search-epochs", type=positive_int,
                help="epochs of the L0-penalised search before the mask is fixed")
    method_flag(parser, command, "--density", type=density, help="fraction of each targeted weight's entries kept")


def method_flag(parser: argparse.ArgumentParser, command: str, flag: str, help: str, **kwargs) -> None:
    """A flag of METHOD_FLAGS[command]: left out of the namespace unless given; parse_args fills in its default."""
    methods, default = METHOD_FLAGS[command][flag]
    parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs,
                        help=f"{help} (--method {' / '.join(methods)}; default: {default})")


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parsed command line; a method-specific flag given with a --method that does not take it is an argparse
    error, and the method-specific flags not given get their defaults."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for flag, (methods, default) in METHOD_FLAGS[args.command].items():
        dest = flag[2:].replace("-", "_")
        if not hasattr(args, dest):
            setattr(args, dest, default)
        elif args.method not in methods:
            parser.error(f"{flag} does not apply to --method {args.method} (only to --method {' / '.join(methods)})")
    return args


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
    args = parse_args(argv, parser)
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
