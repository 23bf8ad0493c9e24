"""fastpeft: kernel-optimized parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""
from fastpeft.api import (active_adapter, active_adapters, adapter_config, adapter_names, delete_adapter,
                          disable_adapters, inject, load_adapter, merge, merge_and_unload, print_trainable_parameters,
                          save_adapter, set_adapter, trainable_parameters, unmerge)
from fastpeft.heap import keep_freed_heap
from fastpeft.methods.bitfit import BitFitConfig
from fastpeft.methods.bottleneck import AdapterConfig, BottleneckConfig
from fastpeft.methods.diff_pruning import DiffPruningConfig, l0_penalty, project_to_density
from fastpeft.methods.frozen_features import FrozenFeaturesConfig
from fastpeft.methods.full_finetuning import FullFinetuningConfig
from fastpeft.methods.lora import LoraConfig
from fastpeft.methods.multitask import MultiTaskConfig
from fastpeft.methods.prefix_tuning import PrefixTuningConfig
from fastpeft.methods.prompt_tuning import PromptTuningConfig
from fastpeft.methods.trainable_tokens import TrainableTokensConfig
from fastpeft.modules.adapter import BottleneckAdapter
from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.hard_concrete import HardConcreteGate
from fastpeft.modules.lora import LoraLinear
from fastpeft.modules.modules_to_save import ModulesToSave
from fastpeft.modules.sparse_delta import SparseDeltaLinear
from fastpeft.ops.lora import lora_linear

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "BitFitConfig", "BottleneckAdapter", "BottleneckConfig", "DiffPruningConfig",
           "DiffSearchLinear", "FrozenFeaturesConfig", "FullFinetuningConfig", "HardConcreteGate", "LoraConfig",
           "MultiTaskConfig", "PrefixTuningConfig", "PromptTuningConfig", "TrainableTokensConfig", "LoraLinear",
           "ModulesToSave", "SparseDeltaLinear", "active_adapter", "active_adapters", "adapter_config",
           "adapter_names", "delete_adapter", "disable_adapters", "inject", "keep_freed_heap", "l0_penalty",
           "load_adapter", "lora_linear", "merge", "merge_and_unload", "print_trainable_parameters",
           "project_to_density", "save_adapter", "set_adapter", "trainable_parameters", "unmerge"]
