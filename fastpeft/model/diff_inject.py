"""Diff pruning at model level. `inject_diff` wraps the targets in DiffSearchLinear (stage 1: dense diffs under
hard-concrete L0 gates); `l0_penalty` is the search's sparsity term; `project_to_density` fixes the mask, replacing
every search layer by a SparseDeltaLinear (stage 2: only the kept values train). A model holds one diff pruning
adapter and no LoRA or bottleneck adapter beside it."""
import torch
from torch import nn

from fastpeft.model.adapter_inject import bottleneck_names
from fastpeft.model.diff_config import DiffPruningConfig
from fastpeft.model.replace import put_in
from fastpeft.model.saved_module import ModulesToSave
from fastpeft.model.targets import find_saved_modules, match_linear, tied_elsewhere
from fastpeft.model.validate import check_inject_args
from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.lora import LoraLinear
from fastpeft.modules.sparse_delta import SparseDeltaLinear
from fastpeft.ops.sparse_delta import index_dtype

REGISTRY = "_fastpeft_diff"  # model attribute: {adapter name: DiffPruningConfig}, at most one entry
METHOD_NAME = "diff pruning"


# --- bookkeeping ----------------------------------------------------------------------------------------------
def diff_names(model: nn.Module) -> list[str]:
    return list(getattr(model, REGISTRY, {}))


def diff_config(model: nn.Module, name: str) -> DiffPruningConfig:
    configs = getattr(model, REGISTRY, {})
    if name not in configs:
        raise ValueError(f"unknown adapter_name {name!r}: the model's diff pruning adapters are {sorted(configs)}")
    return configs[name]


def search_layers(model: nn.Module) -> list[tuple[str, DiffSearchLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, DiffSearchLinear)]


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseDeltaLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


def the_adapter(model: nn.Module) -> tuple[str, DiffPruningConfig]:
    """(name, config) of the model's diff pruning adapter; an error when it has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    configs = getattr(model, REGISTRY, {})
    if not configs:
        raise ValueError(f"{type(model).__name__} has no diff pruning adapter: inject a DiffPruningConfig first")
    return next(iter(configs.items()))


def forget_diff(model: nn.Module) -> None:
    """Drop the model's diff pruning bookkeeping (once no diff pruning layer is left)."""
    if hasattr(model, REGISTRY):
        delattr(model, REGISTRY)


def refuse_diff(model: nn.Module, what: str) -> None:
    """`what` (e.g. "LoRA adapters") does not go into a model that holds a diff pruning adapter."""
    if diff_names(model):
        raise ValueError(f"the model holds diff pruning adapter {diff_names(model)[0]!r}; {what} go into a model "
                         "without one")


def check_new(model: nn.Module, config: DiffPruningConfig, adapter_name: str) -> None:
    """Errors for an `inject` / `load_adapter` that cannot put a diff pruning adapter into `model`."""
    check_inject_args(model, config, DiffPruningConfig, adapter_name)
    if diff_names(model):
        raise ValueError(f"the model already has diff pruning adapter {diff_names(model)[0]!r}; a model holds one "
                         "(start again from the base model to use another)")
    if bottleneck_names(model):
        raise ValueError(f"the model holds bottleneck adapter {bottleneck_names(model)[0]!r}; a diff pruning "
                         "adapter goes into a model without one")
    if any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules()):
        raise ValueError("the model already holds fastpeft LoRA adapters; a diff pruning adapter goes into a model "
                         "without them")


def find_sites(model: nn.Module, config: DiffPruningConfig) -> tuple[list, list]:
    """([(path, linear layer)] the config targets, [(path, module)] its modules_to_save); changes nothing."""
    targets = match_linear(model, config.target_modules, config.modules_to_save, method=METHOD_NAME)
    _refuse_shared_weights(model, targets)
    return targets, find_saved_modules(model, config)


def _refuse_shared_weights(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """The fixed-mask stage writes W0 + delta into the base weight in place, which a tied weight (an output head
    sharing the input embedding) would carry into the other module, and the values' gradient would miss that use."""
    for path, module in targets:
        shared = tied_elsewhere(model, path, module.weight)
        if shared:
            raise ValueError(f"{path}.weight is shared with {shared[0]} (tied weights); diff pruning writes the "
                             f"delta into the weight in place, so leave {path!r} out of target_modules or untie it")


def build_layers(targets: list[tuple[str, nn.Module]], make) -> dict[str, nn.Module]:
    """path -> make(path, module) for every target. Wrapping freezes a base layer and SparseDeltaLinear merges into it,
    so when one fails those already built are undone (requires_grad flags, merged weights) before the error."""
    flags = [(p, p.requires_grad) for _, module in targets for p in module.parameters()]
    built = {}
    try:
        for path, module in targets:
            built[path] = make(path, module)
    except BaseException:
        for layer in built.values():
            if isinstance(layer, SparseDeltaLinear) and layer.merged:
                layer.unmerge()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return built


def apply(model: nn.Module, config: DiffPruningConfig, adapter_name: str, layers: dict[str, nn.Module],
          saved: list[tuple[str, nn.Module]]) -> nn.Module:
    """Put the built `layers` (path -> DiffSearchLinear / SparseDeltaLinear) and modules_to_save copies in, train
    only them, and record the config."""
    for path, layer in layers.items():
        put_in(model, path, layer)
    for path, module in saved:
        wrapper = ModulesToSave(module)
        wrapper.add_adapter(adapter_name)
        put_in(model, path, wrapper)
    setattr(model, REGISTRY, {adapter_name: config})
    train_only_the_adapter(model)
    return model


def train_only_the_adapter(model: nn.Module) -> None:
    """Stage 1: diffs and gates train; stage 2: the kept values; both: the modules_to_save copies."""
    name, _ = the_adapter(model)
    model.requires_grad_(False)
    for _, layer in search_layers(model):
        layer.diff.requires_grad_(True)
        layer.gate.requires_grad_(True)
        if layer.group_gate is not None:
            layer.group_gate.requires_grad_(True)
    for _, layer in sparse_layers(model):
        layer.values.requires_grad_(True)
    for _, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(True)


# --- stage 1 --------------------------------------------------------------------------------------------------
def inject_diff(model: nn.Module, config: DiffPruningConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap every layer `config` targets in DiffSearchLinear (zero diffs: the model computes what it did) and
    freeze everything but the diffs, the gates and the modules_to_save copies."""
    check_new(model, config, adapter_name)
    targets, saved = find_sites(model, config)
    layers = build_layers(targets, lambda _, module: DiffSearchLinear(
        module, config.temperature, config.stretch, config.log_alpha_init, config.structured))
    return apply(model, config, adapter_name, layers, saved)


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """The search's differentiable sparsity term: l0_weight * sum of the layers' expected L0 / number of diff
    entries, i.e. l0_weight times the expected fraction of nonzero diff entries. Normalised so the term lies in
    [0, l0_weight] for any model size and targets, on the scale of a task loss; l0_weight = 1 then means "keeping
    every entry costs as much as one nat of loss"."""
    _, config = the_adapter(model)
    layers = [layer for _, layer in search_layers(model)]
    if not layers:
        raise ValueError("l0_penalty: the model has no search layers left (project_to_density fixed the mask; the "
                         "fixed-mask stage has no L0 term)")
    device = layers[0].diff.device
    expected = torch.stack([layer.expected_l0().to(device) for layer in layers]).sum()
    return expected * (config.l0_weight / sum(layer.diff.numel() for layer in layers))


# --- projection -----------------------------------------------------------------------------------------------
def kept_count(density: float, numel: int) -> int:
    """round(density * numel), but at least 1: every targeted weight (per_weight) or the model (global) keeps
    something to train, however small the density."""
    return min(numel, max(1, round(density * numel)))


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted flat positions of the k largest `scores` (1-D); among equal scores the lower positions win, so
    the choice is deterministic (a zero diff keeps the first k positions)."""
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = (scores > threshold).nonzero().flatten()
    tied = (scores == threshold).nonzero().flatten()[:k - above.numel()]
    return torch.cat([above, tied]).sort().values


@torch.no_grad()
def project_to_density(model: nn.Module, density: float | None = None, scope: str | None = None) -> nn.Module:
    """End the search: keep `density` (default: the config's) of the diff entries with the largest |gated diff|
    (eval-mode gates), per weight or over all targets together (`scope`, default the config's), and replace each
    DiffSearchLinear by a SparseDeltaLinear holding the gated diff there (merged into the base weight). k is
    kept_count(density, numel) per weight, or of all entries for "global", where a weight may keep none. Only the
    kept values and modules_to_save train afterwards; the config records the density and scope used."""
    name, config = the_adapter(model)
    layers = search_layers(model)
    if not layers:
        raise ValueError("project_to_density: the model's mask is already fixed (no search layers left)")
    new_config = config.replace(density=config.density if density is None else density,
                                scope=config.scope if scope is None else scope)  # validates both
    gated = {path: layer.gated_diff().flatten() for path, layer in layers}
    for path, values in gated.items():
        if not torch.isfinite(values).all():
            raise ValueError(f"project_to_density: the gated diff of {path} has non-finite entries")
    keep = _kept_positions({path: values.abs() for path, values in gated.items()}, new_config)
    built = build_layers([(path, layer.base_layer) for path, layer in layers], lambda path, base: SparseDeltaLinear(
        base, keep[path].to(index_dtype(base.weight.numel())), gated[path][keep[path]]))
    for path, layer in built.items():
        put_in(model, path, layer)
    getattr(model, REGISTRY)[name] = new_config
    train_only_the_adapter(model)
    return model


def _kept_positions(scores: dict[str, torch.Tensor], config: DiffPruningConfig) -> dict[str, torch.Tensor]:
    if config.scope == "per_weight":
        return {path: top_positions(s, kept_count(config.density, s.numel())) for path, s in scores.items()}
    device = next(iter(scores.values())).device
    flat = torch.cat([s.to(device) for s in scores.values()])
    kept = top_positions(flat, kept_count(config.density, flat.numel()))
    keep, start = {}, 0
    for path, s in scores.items():
        end = start + s.numel()
        inside = kept[(kept >= start) & (kept < end)]
        keep[path] = (inside - start).to(s.device)
        start = end
    return keep
