"""Prefix tuning adapters in exactly the Hugging Face PEFT format: `adapter_config.json` (peft_type "PREFIX_TUNING")
plus `adapter_model.safetensors` with `prompt_embeddings`, the final prefixes [num_virtual_tokens, num_layers * 2 *
token_dim] (the MLP's output where prefix_projection trained them: PEFT saves and loads those alone), and
modules_to_save, in PEFT's prompt-learning layout (methods/prompt_files.py)."""
import torch
from torch import nn

from fastpeft.methods import prompt_files
from fastpeft.methods.files import Entry, SavedAdapter
from fastpeft.methods.prefix_tuning.build import Plan, apply, encoders_of, plan, remove
from fastpeft.methods.prefix_tuning.config import PrefixTuningConfig
from fastpeft.methods.prefix_tuning.encoder import ATTRIBUTE


def state(model: nn.Module, name: str, config: PrefixTuningConfig) -> tuple[dict, dict, dict]:
    """(PEFT's adapter_config.json, its tensors, no extra metadata) for adapter `name`."""
    with torch.no_grad():
        prefixes = encoders_of(model).encoders[name]()
    return config.to_peft_dict(), prompt_files.tensors(model, name, prefixes), {}


def load(model: nn.Module, saved: SavedAdapter, config: PrefixTuningConfig, name: str, autocast_adapter_dtype: bool):
    """Put the file's prefixes (as plain prefixes, however they were trained) and modules_to_save into `model` as
    `name`. Returns (the config to record, a function undoing the load)."""
    planned = plan(model, config, name, autocast_adapter_dtype)

    def put_prefixes(prefixes: torch.Tensor) -> None:
        encoder = apply(model, planned, name, projection=False)
        with torch.no_grad():
            encoder.embedding.weight.copy_(prefixes)
    undo = prompt_files.load(model, saved, name, file_entries(planned, name), "prefix tuning", put_prefixes, remove)
    return planned.config, undo


def file_entries(planned: Plan, name: str) -> dict[str, Entry]:
    """File key -> Entry (model key, shape, dtype) for every tensor the adapter's file holds, from the plan alone."""
    config = planned.config
    shape = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    prefixes = Entry(f"{ATTRIBUTE}.encoders.{name}.embedding.weight", shape, planned.dtype)
    return prompt_files.entries(prefixes, planned.saved, name)
