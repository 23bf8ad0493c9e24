"""Diff pruning's two stages at model level: `l0_penalty` is the search's sparsity term (stage 1: dense diffs under
hard-concrete L0 gates); `project_to_density` fixes the mask, replacing every search layer by a SparseDeltaLinear
(stage 2: only the kept values train)."""
import torch
from torch import nn

from fastpeft.methods.diff_pruning.config import DiffPruningConfig
from fastpeft.methods.diff_pruning.layers import build_layers, search_layers, sparse_layers
from fastpeft.methods.record import record
from fastpeft.methods.replace import put_in
from fastpeft.modules.sparse_delta import SparseDeltaLinear
from fastpeft.ops.sparse_delta import index_dtype

METHOD = "diff_pruning"  # its name in the model's record


def the_adapter(model: nn.Module) -> tuple[str, DiffPruningConfig]:
    """(name, config) of the model's diff pruning adapter; an error when it has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = record(model).names(METHOD)
    if not names:
        raise ValueError(f"{type(model).__name__} has no diff pruning adapter: inject a DiffPruningConfig first")
    return names[0], record(model).adapters[names[0]].config


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
        layer.values.requires_grad_(True)  # the diffs and gates that trained are gone with the search layers
        put_in(model, path, layer)
    record(model).adapters[name].config = new_config
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


def closed_gates(model: nn.Module) -> float:
    """The fraction of diff entries whose eval-mode element gate is 0, before projection."""
    gates = [layer.gate.deterministic() == 0 for _, layer in search_layers(model)]
    return sum(g.sum().item() for g in gates) / max(sum(g.numel() for g in gates), 1)


def describe_mask(model: nn.Module) -> str:
    """The fixed mask's size and the trainable state of the fixed-mask stage against a dense diff's."""
    layers = [layer for _, layer in sparse_layers(model)]
    nnz = sum(layer.nnz for layer in layers)
    numel = sum(layer.base_layer.weight.numel() for layer in layers)
    # per kept entry: the value, its gradient and AdamW's two moments (fp32), its index and the kept W0 entry
    state = sum(layer.nnz * (4 * layer.values.element_size() + layer.indices.element_size() +
                             layer.base_values.element_size()) for layer in layers)
    dense = 4 * 4 * numel  # a dense fp32 diff with its gradient and AdamW's two moments
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"projected to a fixed mask: nnz {nnz:,} of {numel:,} entries of {len(layers)} weights (density "
            f"{nnz / numel:.4f}); trainable state {state / 2**10:.1f} KiB, {100 * state / dense:.2f}% of a dense "
            f"diff's {dense / 2**20:.1f} MiB; trainable parameters now {trainable:,} (with modules_to_save)")
