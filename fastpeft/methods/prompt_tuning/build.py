"""Putting prompt tuning into a model and taking it out (shared by inject, load and delete): a plan made without
touching the model, then the PromptEmbedding in the word embeddings' place, the modules_to_save copies and the
forward pre-hook."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.prompt_tuning import hook
from fastpeft.methods.prompt_tuning.config import PromptTuningConfig
from fastpeft.methods.prompt_tuning.prompt import PromptEmbedding
from fastpeft.methods.replace import put_in
from fastpeft.methods.targets import find_saved_modules


@dataclass
class Plan:
    config: PromptTuningConfig  # filled from the model, with the task heads
    path: str  # of the word embeddings
    wrapper: PromptEmbedding  # the one in place already, or a new one
    saved: list[tuple[str, nn.Module]]  # modules_to_save
    dtype: torch.dtype  # of the prompt


def prompt_wrappers(model: nn.Module, name: str | None = None) -> list[tuple[str, PromptEmbedding]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, PromptEmbedding)
            and (name is None or name in m.prompts)]


def plan(model: nn.Module, config: PromptTuningConfig, name: str, autocast_adapter_dtype: bool = True) -> Plan:
    """What adding adapter `name` takes; an error naming what does not fit, with the model unchanged."""
    path, embeddings = input_embeddings(model)
    wrapper = embeddings if isinstance(embeddings, PromptEmbedding) else PromptEmbedding(embeddings)
    if name in wrapper.prompts:
        raise ValueError(f"{path} already has a prompt named {name!r}")
    weight = wrapper.base_layer.weight
    config = config.with_task_heads().for_model(model, weight.shape[1])
    half = weight.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if autocast_adapter_dtype and half else weight.dtype
    return Plan(config, path, wrapper, find_saved_modules(model, config), dtype)


def apply(model: nn.Module, planned: Plan, name: str, values: torch.Tensor) -> None:
    """Put the planned prompt (`values`), its modules_to_save copies and the hook in."""
    planned.wrapper.add_adapter(name, values.to(device=planned.wrapper.weight.device, dtype=planned.dtype))
    if model.get_submodule(planned.path) is not planned.wrapper:
        put_in(model, planned.path, planned.wrapper)
    saved_modules.wrap(model, planned.saved, name)
    hook.install(model, planned.path)


def remove(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s prompt; with none left, the word embeddings go back in place and the hook goes."""
    for path, wrapper in prompt_wrappers(model, name):
        wrapper.delete_adapter(name)
        if not len(wrapper.prompts):
            model.set_submodule(path, wrapper.base_layer)
            hook.remove(model)


def input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the model's word embeddings (`get_input_embeddings()`, as PEFT finds them for BERT-style
    and decoder models)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if not isinstance(embeddings, (nn.Embedding, PromptEmbedding)):
        raise ValueError(f"prompt tuning needs the model's word embeddings: {type(model).__name__}"
                         f".get_input_embeddings() must give an nn.Embedding, got {type(embeddings).__name__}")
    path = next((p for p, m in model.named_modules() if m is embeddings), None)
    if not path:
        raise ValueError(f"{type(model).__name__}.get_input_embeddings() is not a submodule of the model")
    return path, embeddings
