"""Putting trainable tokens into a model and taking them out (shared by inject, load and delete): a plan made without
touching the model (the embedding layers, the output layers tied to them), then the layers in their places."""
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft.methods.replace import put_in
from fastpeft.methods.targets import match_names, visible_modules
from fastpeft.methods.trainable_tokens.config import TrainableTokensConfig
from fastpeft.modules.trainable_tokens import TrainableTokensLayer


@dataclass
class Plan:
    config: TrainableTokensConfig  # with target_modules filled in
    embeddings: list[tuple[str, nn.Module]]  # (path, the embedding or its TrainableTokensLayer)
    tied: dict[str, str]  # path of an output layer sharing an embedding's weight -> that embedding's path
    dtype: torch.dtype  # of the rows


def token_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, TrainableTokensLayer]]:
    """(path, layer) of every TrainableTokensLayer (holding adapter `name`), tied output layers included."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, TrainableTokensLayer)
            and (name is None or name in m.owner.token_indices)]


def plan(model: nn.Module, config: TrainableTokensConfig, name: str, autocast_adapter_dtype: bool = True) -> Plan:
    """What adding adapter `name` takes; an error naming what does not fit, with the model unchanged."""
    config = config.for_model(model, _input_embeddings_path(model))
    embeddings = match_names(model, config.target_modules)
    for path, module in embeddings:
        base = module.base_layer if isinstance(module, TrainableTokensLayer) else module
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"target_modules={config.target_modules!r} selects {path} ({type(base).__name__}); "
                             "trainable tokens train rows of nn.Embedding layers")
        if isinstance(module, TrainableTokensLayer) and name in module.token_indices:
            raise ValueError(f"{path} already has trainable tokens named {name!r}")
        too_big = [i for i in config.token_indices if i >= base.num_embeddings]
        if too_big:
            raise ValueError(f"token_indices {too_big[:8]} are beyond the {base.num_embeddings} rows of {path}: "
                             "resize the embeddings first (e.g. fastpeft.domain.extend_vocabulary)")
    weight = embeddings[0][1].weight
    half = weight.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if autocast_adapter_dtype and half else weight.dtype
    return Plan(config, embeddings, _tied_layers(model, embeddings), dtype)


def apply(model: nn.Module, planned: Plan, name: str, values: dict[str, torch.Tensor]) -> None:
    """Put the planned rows (`values`: embedding path -> [rows, dim]) in, wrapping the embeddings and tied layers."""
    layers = {}
    for path, module in planned.embeddings:
        layer = module if isinstance(module, TrainableTokensLayer) else TrainableTokensLayer(module)
        layer.add_adapter(name, list(planned.config.token_indices), values[path].to(planned.dtype))
        if layer is not module:
            put_in(model, path, layer)
        layers[path] = layer
    for path, embedding_path in planned.tied.items():
        if not isinstance(model.get_submodule(path), TrainableTokensLayer):
            put_in(model, path, TrainableTokensLayer(model.get_submodule(path), tied_to=layers[embedding_path]))


def remove(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s rows; layers left with none go back to their base layers (tied ones with them)."""
    emptied = []
    for path, layer in token_layers(model, name):
        if layer.owner is layer:
            layer.delete_adapter(name)
            if not layer.token_indices:
                emptied.append(layer)
    for path, layer in token_layers(model):
        if layer.owner in emptied:
            model.set_submodule(path, layer.base_layer)


def initial_rows(planned: Plan) -> dict[str, torch.Tensor]:
    """The rows' first values: the embedding's own rows (a no-op until trained; PEFT's default) or N(0, 1)."""
    index = list(planned.config.token_indices)
    values = {}
    for path, module in planned.embeddings:
        weight = module.weight.detach()
        values[path] = weight[index].clone() if planned.config.init_weights else \
            torch.randn(len(index), weight.shape[1], device=weight.device, dtype=weight.dtype)
    return values


def _input_embeddings_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    path = next((p for p, m in model.named_modules() if p and m is embeddings), None)
    if path is None:
        raise ValueError(f"target_modules is needed: {type(model).__name__} has no get_input_embeddings() to find "
                         "the word embeddings by")
    return path


def _tied_layers(model: nn.Module, embeddings: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Output layers (nn.Linear) whose weight is one of the embeddings' weight (tie_word_embeddings)."""
    weights = {id(module.weight): path for path, module in embeddings}
    bases = [(path, getattr(m, "base_layer", m) if isinstance(m, TrainableTokensLayer) else m)
             for path, m in visible_modules(model)]
    return {path: weights[id(m.weight)] for path, m in bases if isinstance(m, nn.Linear) and id(m.weight) in weights}
