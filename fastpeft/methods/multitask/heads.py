"""`MultiTaskHeads`: the module multi-task learning adds to an encoder: one head per named task (dropout, then a
linear layer on the last hidden states, pooled for the sequence-level kinds) and one learned log-variance per task,
which weights the task's loss (fastpeft.methods.multitask.loss). The encoder's own forward never calls it."""
import torch
from torch import nn

from fastpeft.methods.multitask.config import MultiTaskConfig


class TaskHead(nn.Module):
    """One task's head: hidden states [B, L, H] (and the attention mask [B, L]) -> logits [B, n] or [B, L, n]."""

    def __init__(self, kind: str, hidden_size: int, num_labels: int, dropout: float, pooling: str, **factory):
        super().__init__()
        self.kind, self.pooling = kind, pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels, **factory)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = hidden.to(self.linear.weight.dtype)
        if self.kind != "token_classification":
            hidden = pool(hidden, attention_mask, self.pooling)
        return self.linear(self.dropout(hidden))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """[B, L, H] -> [B, H]; padding (attention_mask 0) is left out of the mean and of the last token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last position whose mask is 1 (right or left padding)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MultiTaskHeads(nn.Module):
    """`heads[task]` and `log_variances[task]` (s_t = log sigma_t^2, a float32 scalar starting at 0: weight 1)."""

    def __init__(self, config: MultiTaskConfig, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.kinds = {task: spec["kind"] for task, spec in config.tasks.items()}
        self.heads = nn.ModuleDict({task: TaskHead(spec["kind"], hidden_size, spec["num_labels"], config.dropout,
                                                   config.pooling, device=device, dtype=dtype)
                                    for task, spec in config.tasks.items()})
        # float32 whatever the encoder's dtype: exp(-s) of a bfloat16 s moves in steps of ~1%
        self.log_variances = nn.ParameterDict({task: nn.Parameter(torch.zeros((), device=device))
                                               for task in config.tasks})

    def check_task(self, task) -> str:
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; the model's multi-task heads are {list(self.heads)}")
        return task

    def forward(self, task: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.heads[self.check_task(task)](hidden, attention_mask)
