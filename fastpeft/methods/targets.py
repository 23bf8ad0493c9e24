"""Which modules a config targets, by PEFT's rules: module-name suffixes, a regex fully matching the module path, or
"all-linear" (every nn.Linear / Conv1D but the output head); plus which modules `modules_to_save` names. Nothing here
changes the model."""
import re

from torch import nn

from fastpeft.methods.config import ALL_LINEAR, SEQ_CLS_HEADS
from fastpeft.modules.linear import is_conv1d
from fastpeft.modules.lora import LoraLinear
from fastpeft.modules.modules_to_save import ModulesToSave


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or Conv1D, or a LoRA layer (which takes more adapters)."""
    return isinstance(module, (nn.Linear, LoraLinear)) or is_conv1d(module)


def is_wrapper(module: nn.Module) -> bool:
    """A fastpeft module standing in for one of the model's own: a method's layer around its `base_layer`, or a
    modules_to_save wrapper."""
    return isinstance(module, ModulesToSave) or (type(module).__module__.startswith("fastpeft.")
                                                 and isinstance(getattr(module, "base_layer", None), nn.Module))


def visible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module but the root and the insides of fastpeft wrappers (a wrapper itself counts)."""
    found, wrappers = [], ()
    for path, module in model.named_modules():
        if not path or path.startswith(wrappers):
            continue
        found.append((path, module))
        if is_wrapper(module):
            wrappers += (path + ".",)
    return found


def match_names(model: nn.Module, target_modules, modules_to_save=None,
                task_type=None) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules `target_modules` selects (PEFT's rules), leaving out `modules_to_save`; an error
    when they match nothing. Their types are not checked (see match_linear)."""
    modules = visible_modules(model)
    saved = modules_to_save or ()
    all_linear = _all_linear(modules, model, task_type) if target_modules == ALL_LINEAR else set()
    matched = [(path, module) for path, module in modules
               if (path in all_linear or _is_target(target_modules, path))
               and not any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in saved)]
    if not matched:
        raise ValueError(f"target_modules={_show(target_modules)} matches no module of "
                         f"{type(model).__name__}; its linear layers are named e.g. {_linear_names(modules)}")
    if not isinstance(target_modules, str):  # a list: every entry must name something (a typo is not skipped)
        unknown = [t for t in target_modules if not any(path == t or path.endswith("." + t) for path, _ in modules)]
        if unknown:
            raise ValueError(f"target_modules entries {unknown} match no module of {type(model).__name__}; its "
                             f"linear layers are named e.g. {_linear_names(modules)}")
    return matched


def match_linear(model: nn.Module, target_modules, modules_to_save=None, task_type=None,
                 method: str = "LoRA") -> list[tuple[str, nn.Module]]:
    """match_names, and an error naming `method` when a matched module is not linear."""
    matched = match_names(model, target_modules, modules_to_save, task_type)
    unsupported = [f"{path} ({type(module).__name__})" for path, module in matched if not is_linear(module)]
    if unsupported:
        raise ValueError(f"target_modules={_show(target_modules)} selects modules {method} cannot wrap (it wraps "
                         f"nn.Linear and transformers' Conv1D): {unsupported[:8]}")
    return matched


def find_saved_modules(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """Modules `config.modules_to_save` names (PEFT's rule: the path ends with the name); outermost match only."""
    if not config.modules_to_save:
        return []
    found, taken = [], ()
    for path, module in visible_modules(model):
        if path.startswith(taken) or not any(path.endswith(m) for m in config.modules_to_save):
            continue
        if is_wrapper(module) and not isinstance(module, ModulesToSave):
            raise ValueError(f"modules_to_save names {path!r}, which is already an adapter layer "
                             f"({type(module).__name__})")
        found.append((path, module))
        taken += (path + ".",)
    if not found:
        raise ValueError(f"modules_to_save={list(config.modules_to_save)} matches no module of {type(model).__name__}")
    return found


def _is_target(targets, path: str) -> bool:
    if targets == ALL_LINEAR:
        return False  # resolved by _all_linear
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return path in targets or any(path.endswith("." + t) for t in targets)


def _all_linear(modules, model: nn.Module, task_type) -> set[str]:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None and task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if isinstance(getattr(model, n, None), nn.Module)),
                    None)
    return {path for path, module in modules
            if is_linear(module) and (head is None or head not in (module, getattr(module, "base_layer", None)))}


def _linear_names(modules) -> str:
    leaves = sorted({path.rsplit(".", 1)[-1] for path, module in modules if is_linear(module)})
    examples = [path for path, module in modules if is_linear(module)][:3]
    return f"{leaves[:12]} (full paths like {examples})" if leaves else "none (it has no linear layers)"


def _show(targets) -> str:
    return repr(list(targets) if isinstance(targets, tuple) else targets)


def tied_elsewhere(model: nn.Module, path: str, weight: nn.Parameter) -> list[str]:
    """Names of the model's other parameters that are `weight` itself (tied weights, e.g. an output head sharing
    the input embedding): an in-place change of the weight at `path` reaches them too."""
    return [name for name, p in model.named_parameters(remove_duplicate=False)
            if p is weight and name != f"{path}.weight"]
