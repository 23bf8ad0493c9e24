"""Multi-task learning (named task heads on one shared encoder, losses weighted by learned homoscedastic uncertainty,
Kendall, Gal and Cipolla 2018), composable with any method that adapts the encoder."""
from fastpeft.methods.multitask.config import MultiTaskConfig
from fastpeft.methods.multitask.forward import TaskOutput, multitask_forward, task_logits
from fastpeft.methods.multitask.heads import MultiTaskHeads
from fastpeft.methods.multitask.loss import task_loss, task_weights, uncertainty_loss
from fastpeft.methods.multitask.method import MultiTaskMethod
from fastpeft.methods.multitask.sampling import sampling_probabilities, task_batches

__all__ = ["MultiTaskConfig", "MultiTaskHeads", "MultiTaskMethod", "TaskOutput", "multitask_forward",
           "sampling_probabilities", "task_batches", "task_logits", "task_loss", "task_weights", "uncertainty_loss"]
