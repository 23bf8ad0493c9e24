"""Diff pruning's file (the fixed-mask stage): `adapter_config.json` holding {"method": "diff_pruning",
<DiffPruningConfig fields>} and `adapter_model.safetensors` with, per layer, `base_model.model.<layer path>.indices`
(int32 / int64 flat positions in the stored weight, strictly increasing) and `.values` (fp32, the delta there), and
`base_model.model.<module path>.<param>` for modules_to_save; its metadata's "weight_shapes" (JSON: layer path ->
stored weight shape) lets a load refuse a layer of the same size but another shape, where the flat positions would
mean other entries. A load checks every key, dtype, length and index against the model before it changes anything."""
import json

import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.config import ALL_LINEAR
from fastpeft.methods.diff_pruning.config import DiffPruningConfig
from fastpeft.methods.diff_pruning.layers import search_layers, sparse_layers
from fastpeft.methods.diff_pruning.search import kept_count
from fastpeft.methods.files import PREFIX, SavedAdapter, listed
from fastpeft.methods.targets import is_linear
from fastpeft.ops.sparse_delta import INDEX_DTYPES, check_indices

LAYER_TENSORS = ("indices", "values")
SHAPES_KEY = "weight_shapes"  # in the safetensors metadata


def state(model: nn.Module, name: str, config: DiffPruningConfig) -> tuple[dict, dict, dict]:
    if search_layers(model):
        raise ValueError("the diff pruning adapter is still searching (stage 1: dense diffs and gates); call "
                         "project_to_density(model) first: what is saved is the fixed sparse mask and its values")
    layers = dict(sparse_layers(model))
    tensors = {f"{PREFIX}{path}.{key}": getattr(layer, key) for path, layer in layers.items() for key in LAYER_TENSORS}
    tensors.update({PREFIX + key: value for key, value in saved_modules.state(model, name).items()})
    settings = config.to_dict()
    if config.target_modules == ALL_LINEAR:  # the layers it resolved to here, so a load finds exactly them
        settings["target_modules"] = sorted(layers)
    settings["base_model_name_or_path"] = config.base_model_name_or_path or getattr(model, "name_or_path", None) \
        or None
    shapes = json.dumps({path: list(layer.base_layer.weight.shape) for path, layer in layers.items()})
    return settings, tensors, {SHAPES_KEY: shapes}


def check(model: nn.Module, saved: SavedAdapter, config: DiffPruningConfig, targets: dict[str, nn.Module],
          saved_found: dict[str, nn.Module]) -> None:
    """Everything wrong with the file for these targets and modules_to_save, named; nothing when it fits."""
    tensors = saved.tensors
    problems = (_problems(model, targets, saved_found, tensors) or _shape_problems(saved.metadata, targets)
                or _density_problems(config, targets, tensors))
    if problems:
        raise ValueError(f"{saved.weights_path} does not fit a diff pruning adapter of {type(model).__name__} "
                         f"(target_modules={config.target_modules!r}):\n  " + "\n  ".join(problems))


def _problems(model: nn.Module, targets: dict[str, nn.Module], saved: dict[str, nn.Module],
              tensors: dict[str, torch.Tensor]) -> list[str]:
    """Everything wrong with the file's tensors for these targets and modules_to_save, one line per kind."""
    expected = {f"{PREFIX}{path}.{key}" for path in targets for key in LAYER_TENSORS}
    saved_state = {f"{PREFIX}{path}.{key}": value for path, module in saved.items()
                   for key, value in module.state_dict().items()}
    missing = sorted((expected | set(saved_state)) - set(tensors))
    unexpected = [_why_unexpected(model, key, targets) for key in sorted(set(tensors) - expected - set(saved_state))]
    bad = [f"{key}: {why}" for key in sorted(set(saved_state) & set(tensors))
           if (why := _saved_problem(tensors[key], saved_state[key]))]
    for path, module in targets.items():
        indices, values = (tensors.get(f"{PREFIX}{path}.{key}") for key in LAYER_TENSORS)
        if indices is not None and values is not None:
            bad += [f"{PREFIX}{path}.{why}" for why in _layer_problems(indices, values, module.weight.numel())]
    return [f"{label} ({len(items)}): {listed(items)}" for label, items in
            (("missing keys", missing), ("unexpected keys", unexpected), ("bad tensors", bad)) if items]


def _shape_problems(metadata: dict[str, str], targets: dict[str, nn.Module]) -> list[str]:
    """The stored weight shapes the file records (files written before they were recorded pass) against the model's."""
    recorded = metadata.get(SHAPES_KEY)
    try:
        shapes = json.loads(recorded) if recorded is not None else {}
        wrong = [f"{path}: file {tuple(shapes[path])}, model {tuple(module.weight.shape)}"
                 for path, module in targets.items() if path in shapes and tuple(shapes[path]) != module.weight.shape]
    except (ValueError, TypeError) as e:
        return [f"unreadable {SHAPES_KEY} metadata: {e}"]
    return [f"weight shape mismatches ({len(wrong)}): {listed(wrong)}"] if wrong else []


def _density_problems(config: DiffPruningConfig, targets: dict[str, nn.Module],
                      tensors: dict[str, torch.Tensor]) -> list[str]:
    """The config's density and scope against the kept counts of the indices (as project_to_density keeps)."""
    kept = {path: tensors[f"{PREFIX}{path}.indices"].numel() for path in targets}
    sizes = {path: module.weight.numel() for path, module in targets.items()}
    if config.scope == "global":
        wrong = [] if sum(kept.values()) == kept_count(config.density, sum(sizes.values())) else \
            [f"{sum(kept.values())} kept entries in all, not {kept_count(config.density, sum(sizes.values()))}"]
    else:
        wrong = [f"{path}: {kept[path]} kept, not {kept_count(config.density, sizes[path])}" for path in targets
                 if kept[path] != kept_count(config.density, sizes[path])]
    return [f"indices that do not match density={config.density:g}, scope={config.scope!r} ({len(wrong)}): "
            f"{listed(wrong)}"] if wrong else []


def _why_unexpected(model: nn.Module, key: str, targets: dict[str, nn.Module]) -> str:
    path, _, name = key.removeprefix(PREFIX).rpartition(".")
    if name not in LAYER_TENSORS or not key.startswith(PREFIX):
        return key
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return f"{key} (the model has no layer {path!r})"
    if not is_linear(module):
        return f"{key} ({path} is a {type(module).__name__}, not a linear layer)"
    return f"{key} ({path} is not one of the config's target_modules)"


def _layer_problems(indices: torch.Tensor, values: torch.Tensor, numel: int) -> list[str]:
    if indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
        return [f"indices: expected a 1-D int32 or int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}"]
    if values.dtype != torch.float32 or values.dim() != 1:
        return [f"values: expected a 1-D float32 tensor, got {values.dtype} of shape {tuple(values.shape)}"]
    if values.numel() != indices.numel():
        return [f"values: {values.numel()} of them for {indices.numel()} indices"]
    try:
        check_indices(indices, numel)
    except ValueError as e:
        return [f"indices: {e}"]
    return []  # non-finite values: the file reader refuses them


def _saved_problem(file: torch.Tensor, model: torch.Tensor) -> str | None:
    if tuple(file.shape) != tuple(model.shape):
        return f"file shape {tuple(file.shape)}, model {tuple(model.shape)}"
    if file.dtype != model.dtype and not (file.dtype.is_floating_point and model.dtype.is_floating_point):
        return f"file dtype {file.dtype}, model {model.dtype}"
    return None
