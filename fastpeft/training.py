"""A small, fast training loop for sequence classification, with the measurements the demo reports.

Text is tokenised once and padded per batch. Training is AdamW over the trainable parameters with a linear
warm-up / decay schedule; evaluation gives accuracy and logits. `step_times` and `saved_activation_bytes`
measure training steps the same way for any model (fastpeft, HF PEFT, plain).
"""
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          get_linear_schedule_with_warmup)

from fastpeft.datasets import LabelledText
from fastpeft.heap import keep_freed_heap


def load_classifier(model_dir, label_names: list[str], device="cpu"):
    """(model, tokenizer): the pretrained encoder in the local `model_dir` with a new, randomly initialised
    classification head over `label_names`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)})
    return model.to(device), tokenizer


class EncodedText:
    """A labelled split tokenised once; `batches` pads each batch only to its own longest sequence."""

    def __init__(self, tokenizer, data: LabelledText, max_length: int = 128):
        if not len(data):
            raise ValueError("no examples to encode: the labelled text is empty")
        encoded = tokenizer(data.texts, truncation=True, max_length=max_length)
        self.features = [{**{k: v[i] for k, v in encoded.items()}, "labels": y} for i, y in enumerate(data.labels)]
        self.labels = torch.tensor(data.labels)
        self.collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int, shuffle_seed: int | None = None) -> list:
        """Padded batches in file order, or shuffled by `shuffle_seed`."""
        order = list(range(len(self.features)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        return [self.collate([self.features[i] for i in order[s:s + batch_size]])
                for s in range(0, len(order), batch_size)]


def training_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer,
                  penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimizer step on the model's loss plus `penalty()` when given (e.g. diff pruning's L0 term); returns the
    model's loss alone."""
    loss = model(**batch).loss
    (loss if penalty is None else loss + penalty()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # also waits for the device, so the step's wall time is complete


def param_groups(model: nn.Module, lr: float, lr_scales: dict[str, float]) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: one at `lr`, one per `lr_scales` suffix that matches."""
    groups = {None: []} | {suffix: [] for suffix in lr_scales}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[next((s for s in lr_scales if name.endswith(s)), None)].append(p)
    return [{"params": params, "lr": lr * lr_scales.get(suffix, 1.0)} for suffix, params in groups.items() if params]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    def median_step_ms(self, warmup: int = 3) -> float:
        """Median time of a training step, leaving out the first `warmup` steps (allocations, lazy init)."""
        if not self.step_ms:
            raise ValueError("no training step was timed")
        return statistics.median(self.step_ms[warmup:] or self.step_ms)


def train(model: nn.Module, data: EncodedText, epochs: int = 3, lr: float = 1e-3, batch_size: int = 16,
          warmup_ratio: float = 0.1, seed: int = 0, device="cpu", progress: bool = True,
          penalty: Callable[[], torch.Tensor] | None = None, desc: str = "fine-tuning",
          lr_scales: dict[str, float] | None = None) -> TrainResult:
    """Fine-tune the parameters that require grad, minimising the model's loss plus `penalty()` (if given, called
    at every step); batches are reshuffled every epoch; freed CPU memory stays in the process (fastpeft.heap).
    `losses` are the model's losses, without the penalty. `lr_scales` maps a parameter-name suffix to a multiple of
    `lr` for the parameters whose names end with it."""
    keep_freed_heap()
    optimizer = torch.optim.AdamW(param_groups(model, lr, lr_scales or {}), lr=lr)
    total = epochs * math.ceil(len(data) / batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    result = TrainResult()
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            for batch in data.batches(batch_size, shuffle_seed=seed + epoch):
                start = time.perf_counter()
                loss = training_step(model, batch.to(device), optimizer, penalty)
                result.step_ms.append(1e3 * (time.perf_counter() - start))
                result.losses.append(loss)
                scheduler.step()
                bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1)
                bar.update()
    return result


@torch.inference_mode()
def evaluate(model: nn.Module, data: EncodedText, batch_size: int = 64, device="cpu") -> tuple[float, torch.Tensor]:
    """(accuracy, logits [n, num_labels] on the CPU, in data order) in eval mode."""
    model.eval()
    logits = torch.cat([model(**batch.to(device)).logits.float().cpu() for batch in data.batches(batch_size)])
    accuracy = (logits.argmax(-1) == data.labels).float().mean().item()
    return accuracy, logits


def step_times(models: dict[str, nn.Module], batches: list, warmup: int = 2, lr: float = 1e-4,
               device="cpu") -> dict[str, float]:
    """Median ms of a training step (forward, backward, AdamW) per model on the same batches, after `warmup`
    steps. The models take turns on each batch, so a change in machine load hits them alike. Updates the models."""
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
                  for name, m in models.items()}
    times = {name: [] for name in models}
    for model in models.values():
        model.train()
    for batch in batches:
        batch = batch.to(device)
        for name, model in models.items():
            start = time.perf_counter()
            training_step(model, batch, optimizers[name])
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(t[warmup:] or t) for name, t in times.items()}


def saved_activation_bytes(model: nn.Module, batch) -> int:
    """Bytes that autograd keeps for the backward of one training step on `batch`, each storage counted once.
    Parameters and buffers are left out (frozen weights are saved by reference, they cost nothing extra).
    Everything saved is alive together when the forward ends, so this is also the peak."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())
