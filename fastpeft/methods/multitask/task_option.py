"""`--task NAME[:KIND]=PATH`, the command line's way to name one task of a multi-task run and its data file."""
import argparse
from dataclasses import dataclass
from pathlib import Path

from fastpeft.methods.multitask.config import KINDS


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    path: Path


def task_spec(text: str) -> TaskSpec:
    """NAME[:KIND]=PATH, KIND one of KINDS (default classification)."""
    head, sep, path = text.partition("=")
    name, _, kind = head.partition(":")
    kind = kind or "classification"
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"a task is NAME[:KIND]=PATH, e.g. sentiment=train.jsonl or "
                                         f"score:regression=scores.csv; got {text!r}")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"task {name!r}: KIND must be one of {KINDS}, got {kind!r}")
    return TaskSpec(name, kind, Path(path))
