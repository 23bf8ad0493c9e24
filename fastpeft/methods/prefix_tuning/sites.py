"""Where a model's prefixes go, found without touching it.

- BERT-style encoders (a self-attention module with `key` / `value` projections, `num_attention_heads` and
  `attention_head_size`, as BertSelfAttention and its copies in RoBERTa, ELECTRA, ... have): through each of those
  modules, which then sees the prefix rows in front of its keys and values, positions untouched. (PEFT hands them a
  model-level cache instead: transformers 5.25's BertModel takes it as `cache`, not `past_key_values`, so PEFT
  refuses; under 5.17 it runs, and numbers the tokens after the prefix.)
- Other models whose forward takes a key / value cache (GPT-2, Llama, ...): through that cache, pre-filled with the
  prefixes (transformers' DynamicCache), as PEFT does.
"""
import inspect
from dataclasses import dataclass

from torch import nn

from fastpeft.methods.prefix_tuning.config import PrefixTuningConfig, model_sizes

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5.x's name, and its name before


def cache_parameter(module: nn.Module) -> str | None:
    """The name under which `module`'s forward takes a key / value cache: `cache` in transformers 5.25 (whose
    deprecate_kwarg wrapper still maps `past_key_values` onto it), `past_key_values` before (5.17's BertSelfAttention,
    where a `cache` keyword would fall silently into its **kwargs); None if it takes neither."""
    parameters = inspect.signature(module.forward).parameters  # follows functools.wraps to the real signature
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


@dataclass(frozen=True)
class Sites:
    attention: tuple[str, ...]  # paths of the self-attention modules that get the prefixes; () on the cache path
    cache_argument: str | None  # the forward argument that takes the cache; None on the attention path


def find_sites(model: nn.Module, config: PrefixTuningConfig) -> Sites:
    """The sites of `config` (filled from the model) in `model`; an error naming what does not fit."""
    _check_sizes(model, config)
    attention = encoder_self_attention(model)
    if attention:
        _check_attention(model, config, attention)
        return Sites(tuple(path for path, _ in attention), None)
    argument = cache_parameter(model)
    if argument is None:
        raise ValueError(f"prefix tuning needs attention layers: {type(model).__name__} has no BERT-style "
                         f"self-attention modules (key / value projections), and its forward takes no key / value "
                         f"cache ({' / '.join(CACHE_ARGUMENTS)})")
    return Sites((), argument)


def encoder_self_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the BERT-style self-attention modules of an encoder, in layer order."""
    return [(path, m) for path, m in model.named_modules()
            if all(isinstance(getattr(m, a, None), nn.Module) for a in ("key", "value"))
            and all(isinstance(getattr(m, a, None), int) for a in ("num_attention_heads", "attention_head_size"))
            and "Cross" not in type(m).__name__ and not getattr(m, "is_causal", False)]


def _check_sizes(model: nn.Module, config: PrefixTuningConfig) -> None:
    """Sizes given in the config must be the model's (a prefix of another shape cannot join its keys)."""
    found = model_sizes(getattr(model, "config", None))
    for name, value in found.items():
        if value is not None and getattr(config, name) != value:
            raise ValueError(f"{name} must be {type(model).__name__}'s {value} (from its config), got "
                             f"{getattr(config, name)}")


def _check_attention(model: nn.Module, config: PrefixTuningConfig, attention: list[tuple[str, nn.Module]]) -> None:
    path, first = attention[0]
    if len(attention) != config.num_layers:
        raise ValueError(f"num_layers must be the {len(attention)} self-attention layers of {type(model).__name__}, "
                         f"got {config.num_layers}")
    for where, module in attention:
        if cache_parameter(module) is None:
            raise ValueError(f"prefix tuning needs {where} ({type(module).__name__}) to take a key / value cache "
                             f"({' / '.join(CACHE_ARGUMENTS)}), through which it gets the prefix rows")
    heads, size = first.num_attention_heads, first.attention_head_size
    if (heads, size) != (config.num_attention_heads, config.head_dim):
        raise ValueError(f"num_attention_heads / token_dim must be {path}'s {heads} heads of size {size} (token_dim "
                         f"{heads * size}), got {config.num_attention_heads} / {config.token_dim}")
