"""Drop-in nn.Modules over the ops."""
from fastpeft.modules.adapter import BottleneckAdapter, ParallelAdapter, SerialAdapter
from fastpeft.modules.lora import LoraLinear

__all__ = ["BottleneckAdapter", "LoraLinear", "ParallelAdapter", "SerialAdapter"]
