"""The `fastpeft` command.

  fastpeft demo    LoRA-fine-tune the packaged all-MiniLM-L6-v2 on the packaged sentiment data, compare with
                   HF PEFT, save, reload, merge and check (no arguments needed, nothing downloaded)
  fastpeft train   the same on your own local model directory and .csv / .jsonl data
  fastpeft compare every method trained the same way on the demo's model and data: one table of trainable
                   parameters, ms / step, memory, accuracy and file size (markdown, JSON, PNG)
  --method M       in either: another registered method instead of LoRA (`fastpeft train --help` lists them and
                   the flags each takes); methods without a PEFT peer skip the comparison, those that do not merge
                   are checked by reloading
"""
import argparse
import importlib
from pathlib import Path

import transformers

from fastpeft import compare, demo, methods
from fastpeft.arguments import device, output_dir, positive_float, positive_int
from fastpeft.datasets import demo_dataset, load_splits
from fastpeft.methods.config import SEQ_CLS_HEADS

CLASSIFIER_HEADS = list(SEQ_CLS_HEADS)  # trained (new) and saved beside any method's adapter


def method_flags(command: str) -> dict[str, tuple[dict, dict]]:
    """The flags only some methods take, for `command`: flag -> (argparse keywords, {method: its default}). They are
    parsed with default=SUPPRESS, so that one given with another --method is seen and refused, not ignored."""
    flags = {}
    for method in methods.REGISTRY.values():
        taken = method.demo_options if command == "demo" else {f: o["default"] for f, o in method.cli_options.items()}
        for flag, default in taken.items():
            keywords = {k: v for k, v in method.cli_options[flag].items() if k != "default"}
            flags.setdefault(flag, (keywords, {}))[1][method.name] = default
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpeft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    defaults = argparse.ArgumentDefaultsHelpFormatter
    run_demo = commands.add_parser("demo", help="fine-tune the packaged MiniLM on the packaged sentiment data",
                                   formatter_class=defaults)
    run_demo.add_argument("--epochs", type=positive_int, default=2, help="passes over the training data")
    run_demo.add_argument("--output-dir", type=output_dir, default="fastpeft-demo", help="where the adapter is saved")
    run_demo.add_argument("--seed", type=int, default=0, help="seed of the head, adapter init, dropout, shuffling")
    run_demo.add_argument("--device", type=device, default="cpu", help="torch device")
    add_method_arguments(run_demo, "demo")

    train = commands.add_parser("train", help="LoRA-fine-tune a local model on a local labelled .csv / .jsonl file",
                                formatter_class=defaults)
    train.add_argument("--model", type=Path, required=True, help="local Hugging Face model directory")
    train.add_argument("--data", type=Path, help="training data, .csv (with a header) or .jsonl (required, except "
                                                 "with --method multitask, which takes --task)")
    train.add_argument("--test-data", type=Path, help="test data (default: a stratified --test-fraction of --data)")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held out when there is no --test-data")
    train.add_argument("--text-column", default="text", help="column (or JSON key) of the text")
    train.add_argument("--label-column", default="label", help="column (or JSON key) of the label name")
    train.add_argument("--output-dir", type=output_dir, required=True, help="where the adapter is saved")
    train.add_argument("--epochs", type=positive_int, default=3, help="passes over the training data")
    train.add_argument("--lr", type=positive_float, default=2e-3,
                       help="peak AdamW learning rate (linear warm-up, then decay)")
    train.add_argument("--batch-size", type=positive_int, default=16, help="examples per training step")
    train.add_argument("--max-length", type=positive_int, default=128, help="tokens kept per text")
    train.add_argument("--seed", type=int, default=0, help="seed of the head, adapter init, dropout, shuffling, split")
    train.add_argument("--device", type=device, default="cpu", help="torch device")
    add_method_arguments(train, "train")

    run_compare = commands.add_parser("compare", help="train every method the same way on the packaged MiniLM and "
                                      "sentiment data, and tabulate what each costs and gives", formatter_class=defaults)
    run_compare.add_argument("--methods", type=method_list, default=None,
                             help=f"comma-separated methods (default: all of {','.join(methods.names())})")
    run_compare.add_argument("--epochs", type=positive_int, default=2, help="passes over the training data")
    run_compare.add_argument("--output-dir", type=output_dir, default="fastpeft-compare",
                             help="where compare.json, compare.png and each method's adapter are written")
    run_compare.add_argument("--seed", type=int, default=0, help="seed of the heads, adapter inits, shuffling")
    run_compare.add_argument("--device", type=device, default="cpu", help="torch device")
    return parser


def method_list(text: str) -> list[str]:
    """Comma-separated names of registered methods."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in methods.names()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown or [text]}; fastpeft has {methods.names()}")
    return names


def add_method_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """--method (the registry's methods) and the flags that only some methods take, each saying which."""
    parser.add_argument("--method", choices=methods.names(), default=methods.DEFAULT, help="the fine-tuning method")
    for flag, (keywords, defaults) in method_flags(command).items():
        taken = ", ".join(f"{name}: {default}" for name, default in defaults.items())
        parser.add_argument(flag, default=argparse.SUPPRESS, **{**keywords, "help": f"{keywords['help']} "
                                                                 f"(--method {' / '.join(defaults)}; default {taken})"})


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parsed command line, with `args.options` holding the chosen method's flags (defaults filled in) and
    `args.encoder_options` those of its --encoder-method, where it takes one. A flag given with a --method that does
    not take it is an argparse error."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    args.options, args.encoder_options = {}, {}
    if args.command == "compare":  # every method at its demo defaults: no method flags
        return args
    flags = method_flags(args.command)
    args.options = _method_options(args, flags, args.method)
    encoder = args.options.get("encoder_method", "none")
    if encoder != "none":
        if encoder not in methods.names() or encoder == args.method:
            parser.error(f"--encoder-method must be another of {methods.names()} or none, got {encoder!r}")
        args.encoder_options = _method_options(args, flags, encoder)
    for flag, (_, defaults) in flags.items():
        if hasattr(args, flag[2:].replace("-", "_")) and not {args.method, encoder} & set(defaults):
            parser.error(f"{flag} does not apply to --method {args.method} (only to --method {' / '.join(defaults)})")
    return args


def _method_options(args, flags: dict, method: str) -> dict:
    """The flags `method` takes: the given values, else the method's defaults."""
    return {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"), defaults[method])
            for flag, (_, defaults) in flags.items() if method in defaults}


def train_config(args, parser: argparse.ArgumentParser) -> demo.RunConfig:
    """The run `fastpeft train` asked for; bad input is an argparse error (exit status 2)."""
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a Hugging Face model directory (it has no config.json)")
    try:
        config = methods.named(args.method).cli_config(args.options, CLASSIFIER_HEADS, demo=False)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return demo.RunConfig(args.model, args.output_dir, config, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, device=args.device,
                          require_improvement=False, options=args.options)


def run_train(args, parser: argparse.ArgumentParser) -> list[str]:
    """`fastpeft train`: the method's own run where it has one (e.g. several tasks' data), else the classifier run
    on --data; bad input found before training is a usage error."""
    run = methods.named(args.method).cli_run
    takes_tasks = "task" in args.options
    if takes_tasks and (args.data or args.test_data or not args.options["task"]):
        parser.error(f"--method {args.method} takes its data as --task NAME[:KIND]=PATH (one per task), not --data")
    if not takes_tasks and args.data is None:
        parser.error("the following arguments are required: --data")
    if run:  # the method's own run: it raises SetupError for bad input, before any training
        module, function = run.split(":")
        try:
            return getattr(importlib.import_module(module), function)(args)
        except demo.SetupError as e:
            parser.error(str(e))
    cfg = train_config(args, parser)
    try:
        train, test = load_splits(args.data, args.test_data, args.text_column, args.label_column,
                                  args.test_fraction, args.seed)
    except ValueError as e:  # DatasetError, or a --test-fraction outside (0, 1)
        parser.error(str(e))
    try:
        return demo.run(cfg, train, test)
    except demo.SetupError as e:  # e.g. --target-modules or --method that do not fit --model
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    transformers.logging.set_verbosity_error()  # no load reports about the new, untrained head
    transformers.logging.disable_progress_bar()
    if args.command == "compare":
        train, test = demo_dataset()
        report = compare.run(demo.packaged_model_dir(), train, test, args.output_dir, epochs=args.epochs,
                             seed=args.seed, device=args.device, names=args.methods)
        failures = [] if report["rows"] else ["no method could be compared"]
    elif args.command == "demo":
        try:  # a method the demo cannot run (e.g. one that needs several tasks' data) is a usage error
            methods.named(args.method).cli_config(args.options, demo.DEMO_HEADS, demo=True)
        except (TypeError, ValueError) as e:
            parser.error(str(e))
        failures = demo.run_demo(epochs=args.epochs, output_dir=args.output_dir, seed=args.seed, device=args.device,
                                 method=args.method, options=args.options)
    else:
        failures = run_train(args, parser)
    if failures:
        raise SystemExit(1)
    return 0
