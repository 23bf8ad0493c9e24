"""Prompt tuning adapters in exactly the Hugging Face PEFT format: `adapter_config.json` (peft_type "PROMPT_TUNING")
plus `adapter_model.safetensors` with `prompt_embeddings` ([num_virtual_tokens, token_dim]) and modules_to_save under
`base_model.<module path>.<param>`: PEFT's prompt-learning wrapper holds the transformers model itself as
`base_model` (no tuner model between, hence not LoRA's `base_model.model.`). A load checks every key, shape and dtype
before touching the model."""
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.files import Entry, SavedAdapter, check_tensors
from fastpeft.methods.prompt_tuning.build import Plan, apply, plan, prompt_wrappers, remove
from fastpeft.methods.prompt_tuning.config import PromptTuningConfig

PROMPT_KEY = "prompt_embeddings"
SAVED_PREFIX = "base_model."


def state(model: nn.Module, name: str, config: PromptTuningConfig) -> tuple[dict, dict, dict]:
    """(PEFT's adapter_config.json, its tensors, no extra metadata) for adapter `name`."""
    (_, wrapper), = prompt_wrappers(model, name)
    tensors = {PROMPT_KEY: wrapper.prompts[name],
               **{SAVED_PREFIX + key: value for key, value in saved_modules.state(model, name).items()}}
    return config.to_peft_dict(), tensors, {}


def load(model: nn.Module, saved: SavedAdapter, config: PromptTuningConfig, name: str, autocast_adapter_dtype: bool):
    """Put the file's prompt (and modules_to_save) into `model` as `name`. Returns (the config to record, a function
    undoing the load)."""
    planned = plan(model, config, name, autocast_adapter_dtype)
    check_tensors(file_entries(planned, name), saved.tensors,
                  f"{saved.weights_path} does not fit the prompt tuning of {type(model).__name__}")
    apply(model, planned, name, saved.tensors[PROMPT_KEY])

    def undo():
        remove(model, name)
        saved_modules.delete(model, name)
    try:
        saved_modules.copy_in(model, name, saved.tensors, SAVED_PREFIX)
    except BaseException:
        undo()
        raise
    return planned.config, undo


def file_entries(planned: Plan, name: str) -> dict[str, Entry]:
    """File key -> Entry (model key, shape, dtype) for every tensor the adapter's file holds, from the plan alone."""
    config = planned.config
    entries = {PROMPT_KEY: Entry(f"{planned.path}.prompts.{name}", (config.num_virtual_tokens, config.token_dim),
                                 planned.dtype)}
    entries.update(saved_modules.entries(planned.saved, name, SAVED_PREFIX))
    return entries
