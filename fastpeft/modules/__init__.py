"""Drop-in nn.Modules over the ops."""
from fastpeft.modules.adapter import BottleneckAdapter, ParallelAdapter, SerialAdapter
from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.hard_concrete import HardConcreteGate
from fastpeft.modules.lora import LoraLinear
from fastpeft.modules.sparse_delta import SparseDeltaLinear

__all__ = ["BottleneckAdapter", "DiffSearchLinear", "HardConcreteGate", "LoraLinear", "ParallelAdapter",
           "SerialAdapter", "SparseDeltaLinear"]
