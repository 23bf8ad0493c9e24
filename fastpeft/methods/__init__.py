"""The method registry. A method is one folder here (its config, injection, file format, merge) and one line in
`REGISTRY` below; the public API (fastpeft.api) finds every method through these functions."""
import os

from fastpeft.methods.base import Method
from fastpeft.methods.bitfit import BitFitMethod
from fastpeft.methods.bottleneck import BottleneckMethod
from fastpeft.methods.diff_pruning import DiffPruningMethod
from fastpeft.methods.frozen_features import FrozenFeaturesMethod
from fastpeft.methods.full_finetuning import FullFinetuningMethod
from fastpeft.methods.lora import LoraMethod
from fastpeft.methods.multitask import MultiTaskMethod
from fastpeft.methods.prefix_tuning import PrefixTuningMethod
from fastpeft.methods.prompt_tuning import PromptTuningMethod
from fastpeft.methods.trainable_tokens import TrainableTokensMethod

REGISTRY: dict[str, Method] = {method.name: method for method in (
    LoraMethod(),
    BottleneckMethod(),
    DiffPruningMethod(),
    BitFitMethod(),
    FullFinetuningMethod(),
    FrozenFeaturesMethod(),
    PromptTuningMethod(),
    PrefixTuningMethod(),
    MultiTaskMethod(),
    TrainableTokensMethod(),
)}
DEFAULT = "lora"  # the method of `fastpeft demo` / `fastpeft train` without --method


def names() -> list[str]:
    return list(REGISTRY)


def named(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; fastpeft has {names()}")
    return REGISTRY[name]


def for_config(config) -> Method:
    """The method whose config `config` is."""
    for method in REGISTRY.values():
        if isinstance(config, method.config_type):
            return method
    kinds = ", ".join(method.config_type.__name__ for method in REGISTRY.values())
    raise TypeError(f"config must be a fastpeft method config ({kinds}), got {type(config).__name__}")


def for_file(file_config, directory: str) -> Method:
    """The method that reads a saved adapter_config.json (parsed); an error naming the file for anything else."""
    source = os.path.join(directory, "adapter_config.json")
    if not isinstance(file_config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(file_config).__name__}")
    for method in REGISTRY.values():
        if method.reads(file_config):
            return method
    peft_types = " / ".join(repr(m.peft_type) for m in REGISTRY.values() if m.peft_type)
    if "method" not in file_config:  # a PEFT file of a method fastpeft does not have
        raise ValueError(f"{source}: peft_type is {file_config.get('peft_type')!r}; fastpeft loads {peft_types} "
                         "adapters of PEFT")
    named = [m.name for m in REGISTRY.values() if m.reads({"method": m.name})]
    raise ValueError(f"{source}: unknown method {file_config.get('method')!r}; fastpeft reads {named} and PEFT's "
                     f"{peft_types} files (which name no method)")
