"""Running a task: the encoder (with whatever adapters it carries) once, then the task's head on its last hidden
states."""
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from fastpeft.methods.multitask.find import heads_of
from fastpeft.methods.multitask.loss import task_loss


class TaskOutput(NamedTuple):
    logits: torch.Tensor  # [B, num_labels], or [B, L, num_labels] for token_classification
    loss: torch.Tensor | None  # the task's own (unweighted) loss; None without labels


def task_logits(model: nn.Module, task: str, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Task `task`'s head on encoder output `hidden_states` [B, L, H] (`attention_mask` [B, L] for pooling)."""
    return heads_of(model)(task, hidden_states, attention_mask)


def multitask_forward(model: nn.Module, batch: dict, task: str) -> TaskOutput:
    """Encode `batch` (the model's inputs, e.g. input_ids and attention_mask, plus optional "labels") and run task
    `task`'s head; with labels, also the task's loss (fastpeft.methods.multitask.loss.task_loss)."""
    heads = heads_of(model)
    heads.check_task(task)
    if not isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        raise TypeError(f"batch must be a dict of model inputs (and 'labels'), got {type(batch).__name__}")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = getattr(model(**inputs), "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"multi-task heads read the encoder's last_hidden_state; {type(model).__name__}'s output has "
                         "none: inject into the bare encoder (e.g. AutoModel, not a model with its own head)")
    attention_mask = inputs.get("attention_mask")
    logits = heads(task, hidden, attention_mask)
    labels = batch.get("labels")
    loss = None if labels is None else task_loss(heads.kinds[task], logits, labels, attention_mask)
    return TaskOutput(logits, loss)
