"""The public API: inject, save / load, set / delete / disable adapters, merge / unmerge / unload, parameter counts.
Every call goes through the method registry and the model's record of its adapters (fastpeft.methods.record); the
rule for several methods on one model (they must wrap different modules) lives here, in `_refuse_overlap`."""
import contextlib
import os

from torch import nn

from fastpeft import methods
from fastpeft.methods import distributed, files, saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.record import Entry, forget, record, stored_record


def inject(model: nn.Module, config, adapter_name: str = "default", autocast_adapter_dtype: bool = True) -> nn.Module:
    """Put the adapter `config` describes into `model` as `adapter_name`, make it active, and train only the active
    adapters (and their modules_to_save). With `autocast_adapter_dtype` (PEFT's default), LoRA weights on float16 /
    bfloat16 layers are float32. Returns `model`, changed in place."""
    method = methods.for_config(config)
    _check_new(model, method, adapter_name)
    _refuse_overlap(model, method, adapter_name, method.planned_paths(model, config))
    recorded = method.inject(model, config, adapter_name, autocast_adapter_dtype)
    stored_record(model).adapters[adapter_name] = Entry(method.name, recorded)
    set_adapter(model, adapter_name)
    return model


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_main_process: bool | None = None) -> None:
    """Write adapter `adapter_name` to `directory` (adapter_config.json + adapter_model.safetensors; LoRA in PEFT's
    format), replacing an adapter saved there as one step. Only the main process writes (`is_main_process`, by
    default: rank 0 of torch.distributed, or the only process). Weights sharded by FSDP2 are gathered whole first, a
    collective: call it on every rank then (rank 0 may call it alone where nothing is sharded, e.g. under DDP)."""
    entry = record(model).entry(adapter_name)
    config, tensors, metadata = methods.named(entry.method).state(model, adapter_name, entry.config)
    writes = distributed.is_main_process() if is_main_process is None else is_main_process
    tensors = distributed.gathered(tensors, keep=writes)
    if writes:
        files.write_adapter(directory, config, tensors, metadata)


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load a saved adapter (ours, or a LoRA adapter saved by HF PEFT) as `adapter_name` and make it active. Into an
    existing adapter of that name, where its method allows it (LoRA), only the weights are loaded, and its settings
    must agree with the file's. The model is unchanged on any error."""
    saved = files.read_adapter(directory)
    method = methods.for_file(saved.config, saved.directory)
    rec = record(model)
    existing = rec.adapters.get(adapter_name)
    if existing is not None and (existing.method != method.name or method.one_per_model):
        label = methods.named(existing.method).label
        raise ValueError(f"the model already has an adapter named {adapter_name!r} ({label}); delete_adapter it or "
                         "load this one under another name")
    if existing is None:
        _check_new(model, method, adapter_name)
        try:
            planned = method.planned_paths(model, method.file_config(saved))
        except ValueError as e:  # the file's targets do not fit the model
            raise ValueError(e.args[0] if saved.config_path in str(e) else f"{saved.config_path}: {e}") from e
        _refuse_overlap(model, method, adapter_name, planned)
    previous = dict(rec.active)
    config, undo = method.load(model, saved, adapter_name, autocast_adapter_dtype,
                               existing.config if existing else None)
    try:
        stored_record(model).adapters[adapter_name] = Entry(method.name, config)
        set_adapter(model, adapter_name)
    except BaseException:
        undo()
        if existing is None:
            del record(model).adapters[adapter_name]
        _restore_active(model, previous)
        if not record(model).adapters:
            forget(model)
        raise
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the adapter of its method that runs and trains (adapters of other methods on the model stay
    active); only the active adapters' parameters train."""
    rec = record(model)
    entry = rec.entry(adapter_name)
    method = methods.named(entry.method)
    method.activate(model, adapter_name, entry.config)
    saved_modules.activate(model, adapter_name, rec.active.get(method.name))
    rec.set_active(method.name, adapter_name)
    _train_only_active(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter; modules left with none go back to their base modules. Another adapter of the same method,
    if any, becomes active when the deleted one was."""
    rec = record(model)
    method = methods.named(rec.entry(adapter_name).method)
    method.delete(model, adapter_name)
    saved_modules.delete(model, adapter_name)
    del rec.adapters[adapter_name]
    if rec.active.get(method.name) == adapter_name:
        rec.set_active(method.name, None)
        others = rec.names(method.name)
        if others:
            set_adapter(model, others[0])
    if not rec.adapters:
        forget(model)
    _train_only_active(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model only (every adapter off, the original modules_to_save) inside the `with` block."""
    rec = record(model)
    if not rec.adapters:
        raise ValueError(f"{type(model).__name__} has no fastpeft adapters to disable")
    undo = [saved_modules.disable(model)] + [methods.named(m).disable(model) for m in _methods_on(model)]
    try:
        yield model
    finally:
        for restore in reversed(undo):
            restore()


def merge(model: nn.Module) -> nn.Module:
    """Merge every active adapter into the base weights (delta in fp32, rounded once per weight); an error, before
    anything is merged, when one of them cannot be."""
    active = _active(model)
    for method, name in active:
        method.check_merge(model, name)
    for method, name in active:
        method.merge(model, name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight to its exact pre-merge bits."""
    merged = [methods.named(m) for m in _methods_on(model) if methods.named(m).merged_paths(model)]
    if not merged:
        raise ValueError("unmerge(model): no layer of the model is merged")
    for method in merged:
        method.unmerge(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every fastpeft layer by a plain one (a modules_to_save wrapper by the
    active adapter's copy). Returns `model`, changed in place, with no adapters left."""
    active = _active(model)
    for method, name in active:
        method.check_merge(model, name, merged_ok=True)
    for method, name in active:
        method.unload(model, name)
    saved_modules.unload(model)
    forget(model)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, every method's, in the order they came in."""
    return record(model).names()


def active_adapter(model: nn.Module) -> str | None:
    """The adapter activated last (None without adapters); `active_adapters` lists one per method."""
    active = list(record(model).active.values())
    return active[-1] if active else None


def active_adapters(model: nn.Module) -> list[str]:
    return list(record(model).active.values())


def adapter_config(model: nn.Module, adapter_name: str):
    """The config adapter `adapter_name` was injected or loaded with."""
    return record(model).entry(adapter_name).config


def adapter_method(model: nn.Module, adapter_name: str) -> Method:
    return methods.named(record(model).entry(adapter_name).method)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


# --------------------------------------------------------------------------------------------------------- helpers
def _check_new(model: nn.Module, method: Method, name: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter_name {name!r} is an attribute of torch's ModuleDict / ParameterDict, which hold "
                         "the adapters by name: choose another")
    rec = record(model)
    if name in rec.adapters:
        raise ValueError(f"adapter_name {name!r} is taken: the model already has an adapter named {name!r}; "
                         "delete_adapter it or pick another name")
    if method.one_per_model and rec.names(method.name):
        raise ValueError(f"the model already has {method.label} adapter {rec.names(method.name)[0]!r}; a model holds "
                         "one (delete_adapter it to use another)")


def _refuse_overlap(model: nn.Module, method: Method, name: str, planned: set[str]) -> None:
    """Methods share a model only on different modules: two on one module (or one inside the other's) is an error
    naming both. Adapters of one method share modules as that method allows (LoRA layers hold several)."""
    for other_name, entry in record(model).adapters.items():
        if entry.method == method.name:
            continue
        other = methods.named(entry.method)
        for theirs in sorted(other.wrapped_paths(model, other_name)):
            for mine in sorted(planned):
                if mine == theirs or mine.startswith(theirs + ".") or theirs.startswith(mine + "."):
                    raise ValueError(f"{method.label} adapter {name!r} would adapt {mine!r}, where {other.label} "
                                     f"adapter {other_name!r} sits at {theirs!r}: two methods cannot adapt one "
                                     "module; leave it out of one of them")


def _train_only_active(model: nn.Module) -> None:
    model.requires_grad_(False)
    rec = record(model)
    for method_name, name in rec.active.items():
        method = methods.named(method_name)
        for p in method.trainable(model, name, rec.adapters[name].config) + saved_modules.parameters(model, name):
            p.requires_grad_(True)


def _restore_active(model: nn.Module, previous: dict[str, str]) -> None:
    rec = record(model)
    for method_name, name in previous.items():
        if name in rec.adapters:
            set_adapter(model, name)
    for method_name in list(rec.active):
        if method_name not in previous:
            rec.set_active(method_name, None)
    if rec.adapters:
        _train_only_active(model)


def _methods_on(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(entry.method for entry in record(model).adapters.values()))


def _active(model: nn.Module) -> list[tuple[Method, str]]:
    rec = record(model)
    if not rec.adapters:
        raise ValueError(f"{type(model).__name__} has no fastpeft adapters (inject or load_adapter first)")
    return [(methods.named(m), name) for m, name in rec.active.items()]
