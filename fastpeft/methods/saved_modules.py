"""modules_to_save for every method: the modules trained and saved in full beside an adapter (e.g. a classifier
head), one ModulesToSave wrapper per module holding a copy per adapter name."""
from torch import nn

from fastpeft.methods.replace import put_in
from fastpeft.modules.modules_to_save import ModulesToSave


def wrappers(model: nn.Module, name: str | None = None) -> list[tuple[str, ModulesToSave]]:
    """(path, wrapper) of the model's modules_to_save wrappers (those holding a copy for adapter `name`)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, ModulesToSave)
            and (name is None or name in m.modules_to_save)]


def wrap(model: nn.Module, found: list[tuple[str, nn.Module]], name: str) -> None:
    """Give adapter `name` its own trainable copy of each found module (wrapping it where it is not yet)."""
    for path, module in found:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add_adapter(name)
        put_in(model, path, wrapper)


def activate(model: nn.Module, name: str, previous: str | None) -> None:
    """Adapter `name`'s copies run where it has them; where the method's previously active adapter had them, the
    originals run again."""
    for _, wrapper in wrappers(model):
        if name in wrapper.modules_to_save:
            wrapper.active_adapter = name
        elif previous is not None and wrapper.active_adapter == previous:
            wrapper.active_adapter = None


def parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for _, wrapper in wrappers(model, name) for p in wrapper.modules_to_save[name].parameters()]


def state(model: nn.Module, name: str) -> dict:
    """`<path>.<key>` -> tensor of adapter `name`'s copies, as the files store them (under the file prefix)."""
    return {f"{path}.{key}": value for path, wrapper in wrappers(model, name)
            for key, value in wrapper.modules_to_save[name].state_dict().items()}


def delete(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s copies; a wrapper left with none gives its place back to the original module."""
    for path, wrapper in wrappers(model, name):
        wrapper.delete_adapter(name)
        if not len(wrapper.modules_to_save):
            model.set_submodule(path, wrapper.original_module)


def disable(model: nn.Module):
    """Run the original modules; returns the function that undoes it."""
    found = [wrapper for _, wrapper in wrappers(model)]
    before = [wrapper.disabled for wrapper in found]
    for wrapper in found:
        wrapper.disabled = True

    def undo():
        for wrapper, was in zip(found, before):
            wrapper.disabled = was
    return undo


def unload(model: nn.Module) -> None:
    """Every wrapper replaced by the module that runs in it (the active adapter's copy, else the original)."""
    for path, wrapper in wrappers(model):
        wrapper.disabled = False
        model.set_submodule(path, wrapper.active_module)
