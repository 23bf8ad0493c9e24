"""fastpeft: kernel-optimized parameter-efficient fine-tuning for PyTorch and Hugging Face transformers."""
from fastpeft.modules.lora import LoraLinear
from fastpeft.ops.lora import lora_linear

__version__ = "0.1.0"
__all__ = ["LoraLinear", "lora_linear"]
