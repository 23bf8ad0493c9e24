"""`fastpeft train --method multitask`: one shared encoder (the local model, adapted by `--encoder-method` or frozen)
with a head per `--task`, trained on batches drawn from all tasks (proportional or temperature sampling) with the
uncertainty-weighted loss; reports each task's metric before and after, and the learned task weights; saves the
adapters with the tokenizer (fastpeft.domain.save_adapters), reloads them into a fresh encoder and checks that it
predicts the same."""
import math
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from fastpeft import methods
from fastpeft.api import adapter_names, inject, trainable_parameters
from fastpeft.demo import AGREE_ATOL, SetupError
from fastpeft.domain.adapters import load_adapters, save_adapters
from fastpeft.methods.multitask import (
    MultiTaskConfig,
    multitask_forward,
    task_batches,
    task_weights,
    uncertainty_loss,
)
from fastpeft.methods.multitask.loss import IGNORE_INDEX
from fastpeft.methods.multitask.task_option import TaskSpec
from fastpeft.task_data import EncodedTask, load_task

ENCODER_ADAPTER, HEADS_ADAPTER = "encoder", "tasks"


def run(args, log=print) -> list[str]:
    """Train and check as the module docstring says; returns the failed checks (empty when all pass). Bad input
    (a task file, an encoder method that does not fit the model) raises SetupError before any training."""
    transformers.set_seed(args.seed)
    options = args.options
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        splits = {spec.name: (spec, *load_task(spec, args.text_column, args.label_column, args.test_fraction,
                                               args.seed)) for spec in _unique(options["task"])}
        config = MultiTaskConfig(tasks={name: {"kind": spec.kind, "num_labels": len(train.label_names or [0])}
                                        for name, (spec, train, _) in splits.items()},
                                 dropout=options["head_dropout"], pooling=options["pooling"])
        model = build(args.model, config, options["encoder_method"], args.encoder_options, args.device)
    except (OSError, ValueError) as e:  # a data file, a task, the model directory, an encoder method that does
        raise SetupError(str(e)) from None  # not fit: all before any training
    encoded = {name: (EncodedTask(tokenizer, spec.kind, train, args.max_length),
                      EncodedTask(tokenizer, spec.kind, test, args.max_length))
               for name, (spec, train, test) in splits.items()}
    trainable, total = trainable_parameters(model)
    log(f"model {args.model}; tasks: " + ", ".join(f"{name} ({spec.kind}: {len(train)} train / {len(test)} test)"
                                                   for name, (spec, train, test) in splits.items()))
    log(f"encoder: {options['encoder_method']}; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)")
    tests = {name: test for name, (_, test) in encoded.items()}
    before = {name: score(model, name, data, args.device)[0] for name, data in tests.items()}
    train(model, {name: data for name, (data, _) in encoded.items()}, args, options["sampling"],
          options["temperature"])
    after, outputs = {}, {}
    for name, data in tests.items():
        after[name], outputs[name] = score(model, name, data, args.device)
        kind = config.tasks[name]["kind"]
        log(f"  {name:<16} {METRICS[kind]}: {before[name]:.4g} -> {after[name]:.4g}")
    log("learned task weights exp(-s_t): " + ", ".join(f"{t} {w:.3f}" for t, w in task_weights(model).items()))
    save_adapters(model, tokenizer, args.output_dir)
    log(f"adapters saved to {args.output_dir}/ ({', '.join(adapter_names(model))}, tokenizer)")
    fresh = AutoModel.from_pretrained(args.model).to(args.device)
    load_adapters(fresh, args.output_dir)
    failures = []
    for name, data in tests.items():
        diff = (score(fresh, name, data, args.device)[1] - outputs[name]).abs().max().item()
        if diff > AGREE_ATOL:
            failures.append(f"task {name}: the reloaded model disagrees with the trained one (max |diff| {diff:.2e})")
    log("reloaded adapters predict the same: " + ("ok" if not failures else "FAILED"))
    return failures


def _unique(specs: list[TaskSpec]) -> list[TaskSpec]:
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--task names must differ; {twice} given more than once")
    return specs


def build(model_dir: Path, config: MultiTaskConfig, encoder_method: str, encoder_options: dict, device: str):
    """The bare encoder with `encoder_method`'s adapter (its command-line defaults and flags; "none": frozen) and
    the task heads."""
    model = AutoModel.from_pretrained(model_dir).to(device)
    if encoder_method != "none":
        method = methods.named(encoder_method)
        try:
            inject(model, method.cli_config(encoder_options, None, demo=False), adapter_name=ENCODER_ADAPTER)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--encoder-method {encoder_method} does not fit {model_dir}: {e}") from None
    return inject(model, config, adapter_name=HEADS_ADAPTER)


def train(model: nn.Module, data: dict[str, EncodedTask], args, sampling: str, temperature: float | None) -> None:
    """AdamW with linear warm-up / decay over `args.epochs` passes' worth of batches, drawn across the tasks."""
    batches = {name: task.batches(args.batch_size, shuffle_seed=args.seed) for name, task in data.items()}
    steps = args.epochs * sum(len(b) for b in batches.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    model.train()
    drawn = task_batches(batches, sampling, temperature if sampling == "temperature" else None, steps, args.seed)
    for task, batch in tqdm(drawn, total=steps, desc="multi-task fine-tuning", unit="step"):
        loss, _ = uncertainty_loss(model, {task: multitask_forward(model, batch.to(args.device), task).loss})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


METRICS = {"classification": "accuracy", "token_classification": "tag accuracy", "regression": "mean squared error"}


@torch.inference_mode()
def score(model: nn.Module, task: str, data: EncodedTask, device: str) -> tuple[float, torch.Tensor]:
    """(the task's metric, its outputs concatenated on the CPU) in eval mode."""
    model.eval()
    hits = count = 0
    squared, outputs = 0.0, []
    for batch in data.batches(64):
        batch = batch.to(device)
        logits = multitask_forward(model, {k: v for k, v in batch.items() if k != "labels"}, task).logits.float()
        labels = batch["labels"]
        outputs.append(logits.flatten(0, -2).cpu())
        if data.kind == "regression":
            squared += (logits.squeeze(-1) - labels.float()).pow(2).sum().item()
            count += labels.numel()
        else:
            kept = labels != IGNORE_INDEX
            hits += (logits.argmax(-1)[kept] == labels[kept]).sum().item()
            count += kept.sum().item()
    return (squared if data.kind == "regression" else hits) / max(count, 1), torch.cat(outputs)
