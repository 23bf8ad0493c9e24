"""Model-level LoRA: config, injection by target names, several named adapters, merge, PEFT-format save / load;
bottleneck adapters (AdapterConfig) and diff pruning (DiffPruningConfig, then l0_penalty during the search and
project_to_density to fix the mask) through the same inject / save_adapter / load_adapter / merge."""
from fastpeft.model.adapter_config import AdapterConfig
from fastpeft.model.config import LoraConfig
from fastpeft.model.diff_config import DiffPruningConfig
from fastpeft.model.diff_inject import l0_penalty, project_to_density
from fastpeft.model.inject import (active_adapter, adapter_names, delete_adapter, disable_adapters, inject,
                                   print_trainable_parameters, set_adapter, trainable_parameters)
from fastpeft.model.io import load_adapter, save_adapter
from fastpeft.model.merge import merge, merge_and_unload, unmerge
from fastpeft.model.saved_module import ModulesToSave

__all__ = ["AdapterConfig", "DiffPruningConfig", "LoraConfig", "ModulesToSave", "active_adapter", "adapter_names",
           "delete_adapter", "disable_adapters", "inject", "l0_penalty", "load_adapter", "merge", "merge_and_unload",
           "print_trainable_parameters", "project_to_density", "save_adapter", "set_adapter",
           "trainable_parameters", "unmerge"]
