"""Prompt tuning (Lester et al. 2021) in PEFT's config fields and file format."""
from fastpeft.methods.prompt_tuning.config import PromptTuningConfig
from fastpeft.methods.prompt_tuning.method import PromptTuningMethod

__all__ = ["PromptTuningConfig", "PromptTuningMethod"]
