"""Prefix tuning adapters in exactly the Hugging Face PEFT format: `adapter_config.json` (peft_type "PREFIX_TUNING")
plus `adapter_model.safetensors` with `prompt_embeddings`, the final prefixes [num_virtual_tokens, num_layers * 2 *
token_dim] (the MLP's output where prefix_projection trained them: PEFT saves and loads those alone), and
modules_to_save under `base_model.<module path>.<param>`: PEFT's prompt-learning wrapper holds the transformers model
itself as `base_model`. A load checks every key, shape and dtype before touching the model."""
import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.files import Entry, SavedAdapter, check_tensors
from fastpeft.methods.prefix_tuning.build import Plan, apply, encoders_of, plan, remove
from fastpeft.methods.prefix_tuning.config import PrefixTuningConfig
from fastpeft.methods.prefix_tuning.encoder import ATTRIBUTE

PREFIX_KEY = "prompt_embeddings"  # PEFT's key for every prompt-learning method's saved tensor
SAVED_PREFIX = "base_model."


def state(model: nn.Module, name: str, config: PrefixTuningConfig) -> tuple[dict, dict, dict]:
    """(PEFT's adapter_config.json, its tensors, no extra metadata) for adapter `name`."""
    with torch.no_grad():
        prefixes = encoders_of(model).encoders[name]()
    tensors = {PREFIX_KEY: prefixes,
               **{SAVED_PREFIX + key: value for key, value in saved_modules.state(model, name).items()}}
    return config.to_peft_dict(), tensors, {}


def load(model: nn.Module, saved: SavedAdapter, config: PrefixTuningConfig, name: str, autocast_adapter_dtype: bool):
    """Put the file's prefixes (as plain prefixes, however they were trained) and modules_to_save into `model` as
    `name`. Returns (the config to record, a function undoing the load)."""
    planned = plan(model, config, name, autocast_adapter_dtype)
    check_tensors(file_entries(planned, name), saved.tensors,
                  f"{saved.weights_path} does not fit the prefix tuning of {type(model).__name__}")

    def undo():
        remove(model, name)
        saved_modules.delete(model, name)
    try:
        encoder = apply(model, planned, name, projection=False)
        with torch.no_grad():
            encoder.embedding.weight.copy_(saved.tensors[PREFIX_KEY])
        saved_modules.copy_in(model, name, saved.tensors, SAVED_PREFIX)
    except BaseException:
        undo()
        raise
    return planned.config, undo


def file_entries(planned: Plan, name: str) -> dict[str, Entry]:
    """File key -> Entry (model key, shape, dtype) for every tensor the adapter's file holds, from the plan alone."""
    config = planned.config
    shape = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    entries = {PREFIX_KEY: Entry(f"{ATTRIBUTE}.encoders.{name}.embedding.weight", shape, planned.dtype)}
    entries.update(saved_modules.entries(planned.saved, name, SAVED_PREFIX))
    return entries
