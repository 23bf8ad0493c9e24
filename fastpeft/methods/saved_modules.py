"""modules_to_save for every method: the modules trained and saved in full beside an adapter (e.g. a classifier
head), one ModulesToSave wrapper per module holding a copy per adapter name."""
import torch
from torch import nn

from fastpeft.methods.files import Entry
from fastpeft.methods.replace import put_in
from fastpeft.methods.switches import switch_off
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


def entries(found: list[tuple[str, nn.Module]], name: str, prefix: str) -> dict[str, Entry]:
    """File key (`prefix<path>.<key>`) -> Entry for adapter `name`'s copy of each found module, from the plan alone
    (before the copies exist), so that a load is checked before it changes anything."""
    found_entries = {}
    for path, module in found:
        copy = module.modules_to_save[name] if isinstance(module, ModulesToSave) and name in module.modules_to_save \
            else getattr(module, "original_module", module)
        for key, value in copy.state_dict().items():
            found_entries[f"{prefix}{path}.{key}"] = Entry(f"{path}.modules_to_save.{name}.{key}", tuple(value.shape),
                                                           value.dtype)
    return found_entries


@torch.no_grad()
def copy_in(model: nn.Module, name: str, tensors: dict, prefix: str) -> None:
    """Adapter `name`'s copies take the file's values (`prefix<path>.<key>`)."""
    for key, value in state(model, name).items():
        value.copy_(tensors[prefix + key])


def delete(model: nn.Module, name: str) -> None:
    """Drop adapter `name`'s copies; a wrapper left with none gives its place back to the original module."""
    for path, wrapper in wrappers(model, name):
        wrapper.delete_adapter(name)
        if not len(wrapper.modules_to_save):
            model.set_submodule(path, wrapper.original_module)


def disable(model: nn.Module):
    """Run the original modules; returns the function that undoes it."""
    return switch_off(wrapper for _, wrapper in wrappers(model))


def unload(model: nn.Module) -> None:
    """Every wrapper replaced by the module that runs in it (the active adapter's copy, else the original)."""
    for path, wrapper in wrappers(model):
        wrapper.disabled = False
        model.set_submodule(path, wrapper.active_module)
