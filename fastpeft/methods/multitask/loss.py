"""The losses of multi-task learning: each task's own loss (`task_loss`), and their sum weighted by learned
homoscedastic uncertainty (`uncertainty_loss`; Kendall, Gal and Cipolla 2018, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics").

With s_t = log sigma_t^2 learned per task, the total is

    sum_t  c_t * (exp(-s_t) * L_t + s_t),    c_t = 1/2 for regression, 1 for the classification kinds:

a regression task's Gaussian likelihood gives the paper's 1/(2 sigma^2) * L + log sigma (= 1/2 (exp(-s) L + s));
a classification task's term is exp(-s) L + s (the paper's 1/sigma^2 * L + log sigma has s/2 there instead; the
common exp(-s) L + s is used, with its optimum exp(-s_t) = 1 / L_t). A task's weight is exp(-s_t): its loss counts
c_t * exp(-s_t) times; the + s_t term keeps the weights from all going to zero."""
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.methods.multitask.find import heads_of

FACTORS = {"classification": 1.0, "token_classification": 1.0, "regression": 0.5}
IGNORE_INDEX = -100  # a token_classification label that is no label (padding, a word's later sub-tokens)


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean loss of one task's batch, in float32: cross-entropy (classification, over [B] integer labels;
    token_classification, over [B, L] labels, those that are -100 or under a 0 of `attention_mask` left out), or the
    mean squared error (regression, labels [B] for one output or [B, num_labels])."""
    if kind == "regression":
        labels = labels.unsqueeze(-1) if labels.dim() == 1 and logits.shape[-1] == 1 else labels
        if labels.shape != logits.shape:
            raise ValueError(f"regression labels must have shape {tuple(logits.shape)} (or {tuple(logits.shape[:1])} "
                             f"for one output), got {tuple(labels.shape)}")
        return F.mse_loss(logits.float(), labels.float())
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{kind} labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"{kind} labels must be integer class indices, got {labels.dtype}")
    if attention_mask is not None and kind == "token_classification":
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return F.cross_entropy(logits.float().flatten(0, -2), labels.long().flatten(), ignore_index=IGNORE_INDEX)


def uncertainty_loss(model: nn.Module, losses: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the uncertainty-weighted total of `losses` (task -> scalar loss, any subset of the model's tasks), the weight
    exp(-s_t) of each of those tasks, detached) for logging; the total's gradient reaches the s_t."""
    heads = heads_of(model)
    if not isinstance(losses, dict) or not losses:
        raise ValueError(f"losses must be a non-empty dict of task name -> scalar loss, got {losses!r}")
    total, weights = 0.0, {}
    for task, loss in losses.items():
        heads.check_task(task)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"losses[{task!r}] must be a scalar tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        s = heads.log_variances[task]
        precision = torch.exp(-s)
        total = total + FACTORS[heads.kinds[task]] * (precision * loss.float().reshape(()) + s)
        weights[task] = precision.detach()
    return total, weights


def task_weights(model: nn.Module) -> dict[str, float]:
    """exp(-s_t) of every task of the model: how much each task's loss counts now (see the module docstring)."""
    heads = heads_of(model)
    return {task: float(torch.exp(-heads.log_variances[task].detach())) for task in heads.kinds}
