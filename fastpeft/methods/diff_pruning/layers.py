"""The layers of a diff pruning adapter: DiffSearchLinear while searching (stage 1), SparseDeltaLinear once the mask
is fixed (stage 2), and building them all or none."""
from torch import nn

from fastpeft.modules.diff_search import DiffSearchLinear
from fastpeft.modules.sparse_delta import SparseDeltaLinear


def search_layers(model: nn.Module) -> list[tuple[str, DiffSearchLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, DiffSearchLinear)]


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseDeltaLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]


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
