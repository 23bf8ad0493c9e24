"""fastpeft: kernel-optimized parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""
from fastpeft.model import (AdapterConfig, LoraConfig, ModulesToSave, active_adapter, adapter_names, delete_adapter,
                            disable_adapters, inject, load_adapter, merge, merge_and_unload, print_trainable_parameters,
                            save_adapter, set_adapter, trainable_parameters, unmerge)
from fastpeft.modules.adapter import BottleneckAdapter
from fastpeft.modules.lora import LoraLinear
from fastpeft.ops.lora import lora_linear

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "BottleneckAdapter", "LoraConfig", "LoraLinear", "ModulesToSave", "active_adapter",
           "adapter_names", "delete_adapter", "disable_adapters", "inject", "load_adapter", "lora_linear", "merge",
           "merge_and_unload", "print_trainable_parameters", "save_adapter", "set_adapter", "trainable_parameters",
           "unmerge"]
