"""Continued masked-LM pretraining on a domain corpus. The masking is transformers' DataCollatorForLanguageModeling:
dynamic (new masks every batch), 15% of the non-special tokens selected, of those 80% [MASK], 10% a random token,
10% unchanged, labels -100 elsewhere. What it lacks is written here: the corpus to features, the loop over the
parameters that require grad, and a loss on fixed masks to compare before / after."""
import math
import random

import torch
from torch import nn
from transformers import DataCollatorForLanguageModeling

from fastpeft.domain.corpus import sentences

MLM_PROBABILITY = 0.15
MASK_REPLACE_PROB, RANDOM_REPLACE_PROB = 0.8, 0.1  # the rest (10%) stays unchanged


def mlm_collator(tokenizer, mlm_probability: float = MLM_PROBABILITY, seed: int | None = None):
    """BERT's masking rule; `seed` makes the sequence of masks reproducible (still new masks at every call)."""
    if tokenizer.mask_token is None:
        raise ValueError(f"tokenizer must have a mask token for masked-LM pretraining; {type(tokenizer).__name__} "
                         "has none")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                           mask_replace_prob=MASK_REPLACE_PROB,
                                           random_replace_prob=RANDOM_REPLACE_PROB, seed=seed, return_tensors="pt")


def features(tokenizer, corpus, max_length: int = 64) -> list[dict]:
    """One feature per sentence, with the special-tokens mask the collator uses to never mask [CLS] / [SEP] / pads."""
    encoded = tokenizer(sentences(corpus), truncation=True, max_length=max_length, return_special_tokens_mask=True)
    return [{k: v[i] for k, v in encoded.items()} for i in range(len(encoded["input_ids"]))]


def continue_pretraining(model: nn.Module, tokenizer, corpus, steps: int = 100, lr: float = 5e-5,
                         batch_size: int = 16, max_length: int = 64, seed: int = 0, device="cpu") -> list[float]:
    """`steps` AdamW steps of masked-LM loss on `corpus` (sentences, reshuffled every pass, masked anew every batch),
    training the parameters of `model` (a *ForMaskedLM) that require grad. Returns the loss of each step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad: nothing would train")
    data, collate = features(tokenizer, corpus, max_length), mlm_collator(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    order, rng, losses = [], random.Random(seed), []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        loss = model(**collate(batch).to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def mlm_loss(model: nn.Module, tokenizer, corpus, batch_size: int = 32, max_length: int = 64, seed: int = 1234,
             device="cpu") -> float:
    """The masked-LM loss per masked token over `corpus`, in eval mode, on masks fixed by `seed` (so that two
    models, or one before and after training, are compared on the same masks)."""
    data, collate = features(tokenizer, corpus, max_length), mlm_collator(tokenizer, seed=seed)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start:start + batch_size]).to(device)
        masked = int((batch["labels"] != -100).sum())
        if masked:
            total += model(**batch).loss.item() * masked
            count += masked
    return total / count if count else math.nan
