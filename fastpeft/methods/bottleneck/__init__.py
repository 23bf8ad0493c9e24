"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022's parallel adapter)."""
from fastpeft.methods.bottleneck.config import AdapterConfig, BottleneckConfig
from fastpeft.methods.bottleneck.method import BottleneckMethod

__all__ = ["AdapterConfig", "BottleneckConfig", "BottleneckMethod"]
