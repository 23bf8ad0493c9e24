"""The arguments of a module's forward by name, for the forward pre-hooks (prompt and prefix tuning) that edit them."""
import inspect

from torch import nn


def as_keywords(module: nn.Module, args: tuple) -> dict:
    """Positional arguments of `module`'s forward by name."""
    if not args:
        return {}
    parameters = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(parameters):
        raise TypeError(f"{type(module).__name__}.forward takes {len(parameters)} positional arguments, got "
                        f"{len(args)}")
    return dict(zip(parameters, args))
