"""Prefix tuning (Li and Liang 2021) in PEFT's config fields and file format."""
from fastpeft.methods.prefix_tuning.config import PrefixTuningConfig
from fastpeft.methods.prefix_tuning.method import PrefixTuningMethod

__all__ = ["PrefixTuningConfig", "PrefixTuningMethod"]
