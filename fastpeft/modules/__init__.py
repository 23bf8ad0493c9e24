"""Drop-in nn.Modules over the ops."""
from fastpeft.modules.lora import LoraLinear

__all__ = ["LoraLinear"]
