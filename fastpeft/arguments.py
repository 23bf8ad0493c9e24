"""Value types of the command line's flags (argparse `type=`): each checks one value and says what is wrong."""
import argparse
import os
from pathlib import Path

import torch


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
