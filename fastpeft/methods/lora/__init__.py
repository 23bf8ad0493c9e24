"""LoRA (Hu et al. 2021) in PEFT's config fields and file format."""
from fastpeft.methods.lora.config import LoraConfig
from fastpeft.methods.lora.method import LoraMethod

__all__ = ["LoraConfig", "LoraMethod"]
