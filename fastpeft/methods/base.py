"""`Method`: what every method (LoRA, bottleneck adapters, diff pruning, ...) gives the public API. The API keeps the
record of which adapters a model carries and which are active (fastpeft.methods.record); a method only changes the
model's modules. A method that cannot merge says why in `cannot_merge`."""
from typing import Callable

from torch import nn

from fastpeft.methods.files import SavedAdapter


class Method:
    name = ""  # the registry key: `--method`, the "method" field of its files
    label = ""  # in messages, e.g. "bottleneck adapters"
    config_type: type = object
    one_per_model = False  # True: a model holds at most one adapter of this method
    cannot_merge = ""  # why merge is refused; "" for methods that merge
    changes_output_at_init = False  # True: a fresh adapter changes the output (e.g. prompt tuning's new tokens)
    peft_type = ""  # the peft_type of the PEFT files it reads and writes ("" for a format of fastpeft's own)

    # --- what it wraps -------------------------------------------------------------------------------------------
    def planned_paths(self, model: nn.Module, config) -> set[str]:
        """The modules (paths) that injecting `config` would wrap or replace; raises where it cannot inject."""
        raise NotImplementedError

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        """The modules (paths) adapter `name` has wrapped or replaced."""
        raise NotImplementedError

    # --- life cycle ----------------------------------------------------------------------------------------------
    def inject(self, model: nn.Module, config, name: str, autocast_adapter_dtype: bool):
        """Put adapter `name` into `model`; returns the config to record (e.g. with the task head added)."""
        raise NotImplementedError

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """Make adapter `name` the one of this method that runs (None: none of them runs)."""
        raise NotImplementedError

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        """The parameters that train while adapter `name` is active."""
        raise NotImplementedError

    def disable(self, model: nn.Module) -> Callable[[], None]:
        """Make this method's layers run their base modules; returns the function that undoes it."""
        raise NotImplementedError

    def delete(self, model: nn.Module, name: str) -> None:
        """Remove adapter `name`; modules left with no adapter go back to their base module."""
        raise NotImplementedError

    # --- files ---------------------------------------------------------------------------------------------------
    def reads(self, file_config: dict) -> bool:
        """Whether a saved adapter_config.json is this method's."""
        return file_config.get("method") in (self.name, *getattr(self.config_type, "OLD_METHODS", ()))

    def state(self, model: nn.Module, name: str, config) -> tuple[dict, dict, dict]:
        """(config JSON, tensors, safetensors metadata) that save adapter `name`."""
        raise NotImplementedError

    def load(self, model: nn.Module, saved: SavedAdapter, name: str, autocast_adapter_dtype: bool,
             existing_config=None):
        """Put the saved adapter into `model` as `name` (or, where the method allows, into its existing adapter
        `name`, whose config is `existing_config`); returns the config to record. Leaves the model unchanged on
        error."""
        raise NotImplementedError

    def file_config(self, saved: SavedAdapter):
        """The config a saved adapter holds (validated), before anything is loaded."""
        raise NotImplementedError

    # --- merge ---------------------------------------------------------------------------------------------------
    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        """Raise where adapter `name` cannot be merged now (before any method merges anything); `merged_ok`: layers
        merged already are no error (merge_and_unload keeps them merged)."""
        if self.cannot_merge:
            raise ValueError(self.cannot_merge)

    def merge(self, model: nn.Module, name: str) -> None:
        raise ValueError(self.cannot_merge)

    def merged_paths(self, model: nn.Module) -> list[str]:
        """The layers that hold a merged adapter."""
        return []

    def unmerge(self, model: nn.Module) -> None:
        """Restore every merged layer's base weight bit-exactly."""

    def unload(self, model: nn.Module, name: str) -> None:
        """Merge adapter `name` where not yet merged and put plain base layers back in place of this method's."""
        raise ValueError(self.cannot_merge)

    # --- the command line and the demo (fastpeft.cli, fastpeft.demo) ----------------------------------------------
    cli_options: dict[str, dict] = {}  # `fastpeft train` flags: flag -> argparse keywords (type, default, help)
    demo_options: dict[str, object] = {}  # those of cli_options that `fastpeft demo` takes, with its defaults
    demo_lr = 3e-3  # the demo's peak learning rate (prompt tuning needs a far larger one than weight adapters)
    # "module:function" of the run `fastpeft train` makes instead of its single-classifier run, for a method whose
    # run needs other data or set-up (several tasks' files; a vocabulary extended first). Named, not imported: runs
    # sit above the methods. The function takes the parsed arguments and returns the failed checks.
    cli_run = ""

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool):
        """The config a run uses, from the values of cli_options (`demo`: the packaged MiniLM's run)."""
        raise NotImplementedError

    def describe(self, config) -> str:
        """One line naming the method and its settings."""
        return f"{self.label} {config}"

    def before_training(self, model: nn.Module, config, train: Callable, options: dict, log: Callable) -> None:
        """Stages that come before the main training (diff pruning's search); `train(epochs, **kwargs)` runs
        fastpeft.training.train on the run's data."""

    def peft_config(self, config):
        """The same adapter as a HF PEFT config, for the demo's comparison (None: no PEFT run: PEFT lacks the method, or
        refuses it on the demo's model)."""
        return None
