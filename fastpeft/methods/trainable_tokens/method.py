"""Trainable tokens as a method: TrainableTokensLayer on the word embeddings (and on an output layer tied to them),
several named adapters per layer, one active; merge writes the rows into the weight, unmerge puts the base rows back
bit for bit. Files in PEFT's TRAINABLE_TOKENS format: adapter_config.json (peft_type "TRAINABLE_TOKENS",
token_indices, target_modules, init_weights) and adapter_model.safetensors holding
`base_model.model.<path>.trainable_tokens_delta` ([rows, dim], the rows' values) for the embedding and for each tied
output layer (the same values), as peft's save_pretrained writes them."""
from pathlib import Path

from torch import nn

from fastpeft.arguments import positive_int
from fastpeft.methods.base import Method
from fastpeft.methods.config import ENCODER_METHOD_OPTION
from fastpeft.methods.files import PREFIX, Entry, check_tensors
from fastpeft.methods.switches import switch_off
from fastpeft.methods.trainable_tokens.build import (
    Plan,
    apply,
    initial_rows,
    plan,
    remove,
    token_layers,
)
from fastpeft.methods.trainable_tokens.config import PEFT_TYPE, TrainableTokensConfig

KEY = "trainable_tokens_delta"


class TrainableTokensMethod(Method):
    name = "trainable_tokens"
    label = "trainable tokens"
    config_type = TrainableTokensConfig
    peft_type = PEFT_TYPE

    cli_options = {
        "--corpus": dict(type=Path, default=None, help="domain text (one sentence a line) whose frequent words "
                                                       "become new tokens (default: the training texts)"),
        "--min-freq": dict(type=positive_int, default=3, help="times a word must occur to become a token"),
        "--max-new": dict(type=positive_int, default=100, help="new tokens at most (the most frequent words)"),
        "--encoder-method": ENCODER_METHOD_OPTION,
    }
    cli_run = "fastpeft.domain.classify:run"

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool):
        raise ValueError("trainable tokens train the rows of new tokens, which come from extending the vocabulary "
                         "with a domain's words: `fastpeft train --method trainable_tokens` does that on your data "
                         "(the demo does not)")

    def describe(self, config: TrainableTokensConfig) -> str:
        return f"trainable tokens: {len(config.token_indices)} rows of {config.target_modules or 'the embeddings'}"

    def planned_paths(self, model: nn.Module, config: TrainableTokensConfig) -> set[str]:
        planned = plan(model, config, "")
        return {path for path, _ in planned.embeddings} | set(planned.tied)

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, _ in token_layers(model, name)}

    def inject(self, model: nn.Module, config: TrainableTokensConfig, name: str, autocast_adapter_dtype: bool):
        planned = plan(model, config, name, autocast_adapter_dtype)
        apply(model, planned, name, initial_rows(planned))
        return planned.config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        merged = sorted({layer.merged_adapter for _, layer in token_layers(model)
                         if layer.merged_adapter not in (None, name)})
        if merged:
            raise ValueError(f"trainable tokens {merged} are merged into the model; unmerge(model) before switching to "
                             f"{name!r}")
        for _, layer in token_layers(model):
            layer.active_adapter = name if name in layer.owner.token_indices else None

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return [layer.trainable_tokens_delta[name] for _, layer in _owners(model, name)]

    def disable(self, model: nn.Module):
        return switch_off(layer for _, layer in token_layers(model))

    def delete(self, model: nn.Module, name: str) -> None:
        if any(layer.merged_adapter == name for _, layer in token_layers(model)):
            raise ValueError(f"trainable tokens {name!r} are merged; unmerge(model) before deleting them")
        remove(model, name)

    # --- files -------------------------------------------------------------------------------------------------------
    def reads(self, file_config: dict) -> bool:
        return "method" not in file_config and file_config.get("peft_type") == PEFT_TYPE

    def file_config(self, saved) -> TrainableTokensConfig:
        return TrainableTokensConfig.from_peft_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: TrainableTokensConfig):
        tensors = {f"{PREFIX}{path}.{KEY}": layer.owner.trainable_tokens_delta[name]
                   for path, layer in token_layers(model, name)}
        overrides = {} if config.task_type else {"auto_mapping": {"base_model_class": type(model).__name__,
                                                                  "parent_library": type(model).__module__}}
        return config.to_peft_dict(**overrides), tensors, {}

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        if existing_config is not None:
            raise ValueError(f"the model already has trainable tokens named {name!r}; delete_adapter them or load "
                             "these under another name")
        planned = plan(model, self.file_config(saved), name, autocast_adapter_dtype)
        entries = _file_entries(planned, name)
        check_tensors(entries, saved.tensors, f"{saved.weights_path} does not fit the trainable tokens of "
                                              f"{type(model).__name__}")
        values = {path: saved.tensors[f"{PREFIX}{path}.{KEY}"] for path, _ in planned.embeddings}
        apply(model, planned, name, values)
        return planned.config, lambda: remove(model, name)

    # --- merge -------------------------------------------------------------------------------------------------------
    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        merged = self.merged_paths(model)
        if merged and not merged_ok:
            raise ValueError(f"the model is already merged (e.g. {merged[0]!r}); unmerge(model) first")

    def merge(self, model: nn.Module, name: str) -> None:
        for _, layer in _owners(model, name):
            layer.merge(name)

    def merged_paths(self, model: nn.Module) -> list[str]:
        return [path for path, layer in token_layers(model) if layer.merged_adapter is not None]

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in token_layers(model):
            if layer.merged_adapter is not None:
                layer.unmerge()

    def unload(self, model: nn.Module, name: str) -> None:
        for _, layer in _owners(model, name):
            if layer.merged_adapter is None:
                layer.merge(name)
        for path, layer in token_layers(model):
            model.set_submodule(path, layer.base_layer)


def _owners(model: nn.Module, name: str):
    """(path, layer) of the embedding layers holding adapter `name`'s rows (not the tied output layers)."""
    return [(path, layer) for path, layer in token_layers(model, name) if layer.owner is layer]


def _file_entries(planned: Plan, name: str) -> dict[str, Entry]:
    """File key -> Entry for every tensor the file holds: the rows of each embedding, again under each tied layer."""
    rows = len(planned.config.token_indices)
    entries = {f"{PREFIX}{path}.{KEY}": Entry(f"{path}.{KEY}.{name}", (rows, module.weight.shape[1]), planned.dtype)
               for path, module in planned.embeddings}
    for path, embedding_path in planned.tied.items():
        entries[f"{PREFIX}{path}.{KEY}"] = entries[f"{PREFIX}{embedding_path}.{KEY}"]
    return entries
