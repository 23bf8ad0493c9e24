"""The implementations that bench.e2e trains: MiniLM sequence classifiers, each with its own copy of the same model
(the same new head), its trainable parameters and its AdamW.

  floor              every weight frozen, the gradient still flowing back to the embeddings (their output requires
                     grad): what any method that adapts every layer must at least pay; no optimizer step,
  lora, lora_p0      fastpeft LoRA on every linear layer but the head, r=8, alpha=16, dropout 0.1 / 0,
  peft_lora(_p0)     the same LoRA in HF PEFT (the config converted by the LoRA method's peft_config),
  <method>           every other registered method in its `fastpeft demo` set-up (its cli_config(demo=True)), its
                     stages before training (diff pruning's L0 search and projection) run on the demo data, so its
                     step is the step of the main training; methods that have no demo run are left out, with why.
The head (`classifier`) trains in full beside every method but the floor.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import peft
import torch
from torch import nn
from transformers import logging as transformers_logging

from fastpeft import methods, training
from fastpeft.api import inject
from fastpeft.datasets import demo_dataset
from fastpeft.demo import DEMO_HEADS, packaged_model_dir
from fastpeft.methods.lora.config import LoraConfig

SEARCH_BATCH = 32  # batch of the stages before training (diff pruning's search), whatever the timed batch
LORA_DROPOUTS = {"lora": 0.1, "lora_p0": 0.0}
PEFT_NAMES = {"peft_lora": "lora", "peft_lora_p0": "lora_p0"}  # each PEFT row and the fastpeft row it is compared to


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer | NoStep
    describe: str

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}


class NoStep:
    """The floor's optimizer, for training_step: it has nothing to update (torch's refuse an empty parameter list)."""

    def step(self) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def base_model(model_dir, layers: int | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, demo train split): the encoder in `model_dir` (None: the packaged MiniLM) with a new
    two-label head, seeded, optionally cut to its first `layers` encoder layers (for quick runs)."""
    train, _ = demo_dataset()
    torch.manual_seed(0)
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # no load report about the new, untrained head
    try:
        model, tokenizer = training.load_classifier(model_dir or packaged_model_dir(), train.label_names)
    finally:
        transformers_logging.set_verbosity(level)
    if layers is not None:
        model.base_model.encoder.layer = model.base_model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model.to(device=device, dtype=dtype), tokenizer, train


def batch(tokenizer, train, size: int, seq: int, device: torch.device) -> dict:
    """The first `size` demo sentences, padded (or cut) to exactly `seq` tokens, with their labels."""
    encoded = tokenizer(train.texts[:size], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {**{k: v.to(device) for k, v in encoded.items()}, "labels": torch.tensor(train.labels[:size], device=device)}


def lora_config(dropout: float) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                      modules_to_save=DEMO_HEADS)


def adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """torch's fused AdamW, the same for every implementation: one kernel per step instead of a dozen small ops per
    parameter tensor, which would weigh on methods with many small tensors (LoRA: 2 per layer) and not the floor."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)


def floor(base: nn.Module) -> Setup:
    model = copy.deepcopy(base).requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    return Setup(model, NoStep(), "every weight frozen, gradient back to the embeddings' output")


def fastpeft_setup(base: nn.Module, config, options: dict, data: training.EncodedText) -> Setup:
    """A copy of `base` with the registered method of `config` injected and its stages before training run on
    `data` (as `fastpeft demo` runs them)."""
    method, model = methods.for_config(config), copy.deepcopy(base)
    inject(model, config)
    device = next(model.parameters()).device
    method.before_training(model, config, lambda epochs, **kwargs: training.train(
        model, data, epochs, method.demo_lr, SEARCH_BATCH, device=device, progress=False, **kwargs),
        options, lambda line: None)
    return Setup(model, adamw(model, method.demo_lr), f"fastpeft {method.describe(config)}")


def peft_setup(base: nn.Module, dropout: float) -> Setup:
    lora = methods.for_config(lora_config(dropout))
    model = peft.get_peft_model(copy.deepcopy(base), lora.peft_config(lora_config(dropout)))
    return Setup(model, adamw(model, lora.demo_lr), f"HF PEFT {lora.describe(lora_config(dropout))}")


def build(base: nn.Module, tokenizer, train, seq: int, only: list[str] | None = None,
          search_examples: int | None = None) -> tuple[dict[str, Setup], dict[str, str]]:
    """({name: Setup}, {left-out method: why}); `only` builds those implementations alone. The stages before
    training run on the first `search_examples` demo sentences (default: all)."""
    data = training.EncodedText(tokenizer, train.subset(range(min(search_examples or len(train), len(train)))), seq)
    plans = {"floor": lambda: floor(base)}
    plans |= {name: (lambda p=LORA_DROPOUTS[ours]: peft_setup(base, p)) for name, ours in PEFT_NAMES.items()}
    plans |= {name: (lambda p=p: fastpeft_setup(base, lora_config(p), {}, data))
              for name, p in LORA_DROPOUTS.items()}
    left_out = {}
    for name in methods.names():
        if name == "lora":  # LoRA runs all-linear above, not in its demo set-up (query, value)
            continue
        method = methods.named(name)
        options = {flag[2:].replace("-", "_"): value for flag, value in method.demo_options.items()}
        try:
            config = method.cli_config(options, DEMO_HEADS, demo=True)
        except ValueError as why:
            left_out[name] = str(why)
            continue
        plans[name] = lambda config=config, options=options: fastpeft_setup(base, config, options, data)
    unknown = sorted(set(only or []) - set(plans))
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; bench.e2e has {list(plans)}")
    return {name: plans[name]() for name in dict.fromkeys(only or plans)}, left_out
