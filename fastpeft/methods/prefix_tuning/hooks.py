"""The forward pre-hooks that put the active adapter's prefixes into the attention (sites: see .sites).

- Cache path (GPT-2, Llama, ...): a hook on the model hands its forward a DynamicCache holding every layer's prefix
  (filling an empty one in place, so that `generate`'s own cache keeps it), and puts ones in front of a 2-D
  attention_mask. A cache that holds tokens already (a later generation step) holds the prefix too and is left
  alone. Positions are PEFT's: the real tokens are numbered after the prefix, num_virtual_tokens on (as the model
  numbers them by itself after a cache of that length, and as Li and Liang's GPT-2 code did), so given position_ids
  are shifted by num_virtual_tokens. Prefixes trained with PEFT expect those positions, and `generate` (which passes
  position_ids counted from the attention mask) then sees the same ones as a forward without position_ids.
- Attention path (BERT-style encoders): a hook on each self-attention module hands it, as its cache argument, a
  `PrefixRows` that puts the layer's prefix in front of its keys and values, and puts "attend" columns in front of
  its 4-D attention mask. Embeddings, positions and everything outside the attention are untouched. The cache
  argument is named as the module's forward names it: `cache` in transformers 5.25, `past_key_values` in 5.17
  (there a `cache` keyword would fall into its **kwargs unused, leaving the keys short of the widened mask); both
  versions then call the cache's `update` once and pass the mask through to the attention function alike.
Hooks are partials of module-level functions (no closures), so that copy.deepcopy and pickling carry them along."""
import functools

import torch
from torch import nn
from transformers import DynamicCache

from fastpeft.methods.call_args import as_keywords
from fastpeft.methods.prefix_tuning.encoder import ATTRIBUTE, PrefixEncoders
from fastpeft.methods.prefix_tuning.sites import CACHE_ARGUMENTS, Sites, cache_parameter


def install(model: nn.Module, sites: Sites) -> None:
    """Hook `model` (once) to give the attention the active adapter's prefixes."""
    if _hooked(model):
        return
    encoders = model.get_submodule(ATTRIBUTE)
    if sites.cache_argument is not None:
        model.register_forward_pre_hook(functools.partial(prefix_cache, sites.cache_argument), with_kwargs=True)
    for layer, path in enumerate(sites.attention):
        module = model.get_submodule(path)
        module.register_forward_pre_hook(
            functools.partial(prefix_attention, cache_parameter(module), layer, encoders), with_kwargs=True)


def remove(model: nn.Module) -> None:
    # Handles from register_forward_pre_hook do not survive a deepcopy of the model: hooks are found by function.
    for module in model.modules():
        for key in _hook_keys(module):
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def _hooked(model: nn.Module) -> bool:
    return any(_hook_keys(module) for module in model.modules())


def _hook_keys(module: nn.Module) -> list[int]:
    return [key for key, hook in module._forward_pre_hooks.items()
            if getattr(hook, "func", None) in (prefix_cache, prefix_attention)]


# ------------------------------------------------------------------------------------------------------ cache path
def prefix_cache(argument: str, model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with_kwargs) of the model: its inputs with the prefixes in the cache; None (inputs unchanged)
    when no adapter is active."""
    encoders: PrefixEncoders = model.get_submodule(ATTRIBUTE)
    encoder = encoders.active()
    if encoder is None:
        return None
    kwargs = {**as_keywords(model, args), **kwargs}
    n = encoder.embedding.num_embeddings
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"prefix tuning needs a 2-D attention_mask [batch, sequence] (it puts ones in front for "
                             f"the {n} prefix positions), got {getattr(mask, 'shape', type(mask).__name__)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    if kwargs.get("position_ids") is not None:  # PEFT's numbering: the real tokens come after the prefix
        kwargs["position_ids"] = kwargs["position_ids"] + n
    key = next((k for k in CACHE_ARGUMENTS if kwargs.get(k) is not None), argument)
    cache = kwargs.get(key)
    if cache is not None and cache.get_seq_length() > 0:  # a later generation step: the prefix is in it already
        return (), kwargs
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError(f"{type(model).__name__} with prefix tuning needs input_ids or inputs_embeds")
    if cache is None:
        config = getattr(model, "config", None)
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    prefixes = encoder()
    dtype = getattr(model, "dtype", prefixes.dtype)  # PEFT: the base model's dtype
    for layer in range(encoder.num_layers):
        cache.update(*encoder.layer(prefixes, layer, inputs.shape[0], dtype), layer)
    kwargs[key] = cache
    return (), kwargs


# -------------------------------------------------------------------------------------------------- attention path
class PrefixRows:
    """Stands in for one self-attention call's cache argument: such a module's one use of a cache is `update`, which
    returns the keys and values to attend over; here, the call's own behind the layer's prefix rows."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        return (torch.cat([self.key.to(key.dtype), key], dim=-2),
                torch.cat([self.value.to(value.dtype), value], dim=-2))


def prefix_attention(argument: str, layer: int, encoders: PrefixEncoders, module: nn.Module, args: tuple,
                     kwargs: dict):
    """Forward pre-hook (with_kwargs) of self-attention module number `layer`: its prefix rows as the cache (given
    as `argument`, the module's name for it: see .sites.cache_parameter), and its attention mask widened to match."""
    encoder = encoders.active()
    if encoder is None:
        return None
    kwargs = {**as_keywords(module, args), **kwargs}
    if any(kwargs.get(k) is not None for k in CACHE_ARGUMENTS):
        raise ValueError(f"prefix tuning on {type(module).__name__} does not combine with a key / value cache "
                         f"(use_cache): it puts the prefix in front of each call's own keys")
    hidden = kwargs["hidden_states"]
    key, value = encoder.layer(encoder(), layer, hidden.shape[0], hidden.dtype)
    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}
    kwargs[argument] = PrefixRows(key, value)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError(f"prefix tuning needs {type(module).__name__}'s attention mask 4-D [batch, heads, query, "
                             f"key], got {getattr(mask, 'shape', type(mask).__name__)}")
        attend = torch.ones if mask.dtype == torch.bool else torch.zeros  # boolean: True attends; additive: 0 does
        front = attend(*mask.shape[:-1], key.shape[-2], dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([front, mask], dim=-1)
    return (), kwargs
