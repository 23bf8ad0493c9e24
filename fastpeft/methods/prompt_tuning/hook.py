"""The forward pre-hook on the model that puts the active prompt in front of its input, as PEFT's prompt-learning
model wrappers do in their forward.

Why a hook on the model and not only a module in the embeddings' place: the prompt lengthens the sequence, and the
inputs that go with it (attention mask, position / token type ids, per-token labels) enter the model's forward,
not the embeddings (BERT adds position and token type embeddings of the input's length right after the word
embeddings). So the hook turns input_ids into inputs_embeds with the prompt in front and lengthens the rest; the
prompt itself lives in the PromptEmbedding that stands in the embeddings' place. The hook is a partial of a
module-level function holding only the embeddings' path, so copy.deepcopy and pickling of the model carry it along.

What PEFT does, and where this differs:
- attention_mask: ones in front, also in generation steps that continue a cache (which holds the prompt).
- position_ids: PEFT drops them (warning), so the model numbers the whole sequence 0, 1, ...: real tokens start at
  num_virtual_tokens. Given ones are shifted by num_virtual_tokens behind 0 .. num_virtual_tokens - 1, the same
  for the default positions, and left padding keeps its meaning.
- token_type_ids: zeros in front (PEFT drops them outside SEQ_CLS; the same for single-segment input).
- labels: -100 in front of per-token labels (CAUSAL_LM, TOKEN_CLS), so no loss is computed at virtual positions.
"""
import functools

import torch
from torch import nn

from fastpeft.methods.call_args import as_keywords
from fastpeft.methods.record import record

PER_TOKEN_LABELS = ("CAUSAL_LM", "TOKEN_CLS")
IGNORE_INDEX = -100  # the label transformers' losses skip


def install(model: nn.Module, path: str) -> None:
    """Hook `model` (once) to prepend the prompt of the PromptEmbedding at `path`."""
    if not _hook_keys(model):
        model.register_forward_pre_hook(functools.partial(prepend_prompt, path), with_kwargs=True)


def remove(model: nn.Module) -> None:
    # The handle returned by register_forward_pre_hook does not survive a deepcopy of the model, so the hook is
    # found by its function in the module's hook dicts.
    for key in _hook_keys(model):
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


def _hook_keys(model: nn.Module) -> list[int]:
    return [key for key, hook in model._forward_pre_hooks.items() if getattr(hook, "func", None) is prepend_prompt]


def prepend_prompt(path: str, model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with_kwargs): the model's inputs with the active prompt in front; None (inputs unchanged)
    when no prompt is active."""
    wrapper = model.get_submodule(path)
    prompt = wrapper.active_prompt()
    if prompt is None:
        return None
    kwargs = {**as_keywords(model, args), **kwargs}
    n = prompt.shape[0]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"prompt tuning needs a 2-D attention_mask [batch, sequence] (it puts ones in front for "
                             f"the {n} virtual tokens), got {getattr(mask, 'shape', type(mask).__name__)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    positions = kwargs.get("position_ids")
    if _continues_cache(kwargs):  # a generation step after the first: the cache holds the prompt already
        if positions is not None:
            kwargs["position_ids"] = positions + n
        return (), kwargs

    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        if kwargs.get("input_ids") is None:
            raise ValueError(f"{type(model).__name__} with prompt tuning needs input_ids or inputs_embeds")
        embeds = wrapper.base_layer(kwargs["input_ids"])
    front = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
    kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([front, embeds], dim=1)
    if positions is not None:
        first = torch.arange(n, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], n)
        kwargs["position_ids"] = torch.cat([first, positions + n], dim=-1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(*token_types.shape[:-1], n), token_types], dim=-1)
    labels = kwargs.get("labels")
    entry = record(model).adapters.get(wrapper.active_adapter)
    if labels is not None and entry is not None and entry.config.task_type in PER_TOKEN_LABELS:
        kwargs["labels"] = torch.cat([labels.new_full((*labels.shape[:-1], n), IGNORE_INDEX), labels], dim=-1)
    return (), kwargs


def _continues_cache(kwargs: dict) -> bool:
    """Whether the call extends a key/value cache that already holds tokens (`cache`, before transformers 5.x
    `past_key_values`)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    return bool(length() if length is not None else len(cache))
