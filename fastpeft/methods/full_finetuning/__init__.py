"""Full fine-tuning: every parameter trains (the baseline)."""
from fastpeft.methods.full_finetuning.config import FullFinetuningConfig
from fastpeft.methods.full_finetuning.method import FullFinetuningMethod

__all__ = ["FullFinetuningConfig", "FullFinetuningMethod"]
