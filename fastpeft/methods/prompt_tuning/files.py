"""Prompt tuning adapters in exactly the Hugging Face PEFT format: `adapter_config.json` (peft_type "PROMPT_TUNING")
plus `adapter_model.safetensors` with `prompt_embeddings` ([num_virtual_tokens, token_dim]) and modules_to_save, in
PEFT's prompt-learning layout (methods/prompt_files.py)."""
from torch import nn

from fastpeft.methods import prompt_files
from fastpeft.methods.files import Entry, SavedAdapter
from fastpeft.methods.prompt_tuning.build import Plan, apply, plan, prompt_wrappers, remove
from fastpeft.methods.prompt_tuning.config import PromptTuningConfig


def state(model: nn.Module, name: str, config: PromptTuningConfig) -> tuple[dict, dict, dict]:
    """(PEFT's adapter_config.json, its tensors, no extra metadata) for adapter `name`."""
    (_, wrapper), = prompt_wrappers(model, name)
    return config.to_peft_dict(), prompt_files.tensors(model, name, wrapper.prompts[name]), {}


def load(model: nn.Module, saved: SavedAdapter, config: PromptTuningConfig, name: str, autocast_adapter_dtype: bool):
    """Put the file's prompt (and modules_to_save) into `model` as `name`. Returns (the config to record, a function
    undoing the load)."""
    planned = plan(model, config, name, autocast_adapter_dtype)
    undo = prompt_files.load(model, saved, name, file_entries(planned, name), "prompt tuning",
                             lambda prompt: apply(model, planned, name, prompt), remove)
    return planned.config, undo


def file_entries(planned: Plan, name: str) -> dict[str, Entry]:
    """File key -> Entry (model key, shape, dtype) for every tensor the adapter's file holds, from the plan alone."""
    config = planned.config
    prompt = Entry(f"{planned.path}.prompts.{name}", (config.num_virtual_tokens, config.token_dim), planned.dtype)
    return prompt_files.entries(prompt, planned.saved, name)
