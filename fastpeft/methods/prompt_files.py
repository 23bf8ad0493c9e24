"""What prompt tuning's and prefix tuning's files share, PEFT's prompt-learning layout: the method's one tensor under
`prompt_embeddings` and modules_to_save under `base_model.<module path>.<param>` (PEFT's prompt-learning wrapper
holds the transformers model itself as `base_model`, no tuner model between, hence not LoRA's `base_model.model.`);
and a load that checks every key, shape and dtype before it touches the model and undoes itself on failure."""
from collections.abc import Callable

import torch
from torch import nn

from fastpeft.methods import saved_modules
from fastpeft.methods.files import Entry, SavedAdapter, check_tensors

PROMPT_KEY = "prompt_embeddings"  # PEFT's key for every prompt-learning method's saved tensor
SAVED_PREFIX = "base_model."


def tensors(model: nn.Module, name: str, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The file's tensors: adapter `name`'s `prompt` and its modules_to_save."""
    saved = saved_modules.state(model, name)
    return {PROMPT_KEY: prompt, **{SAVED_PREFIX + key: value for key, value in saved.items()}}


def entries(prompt: Entry, saved: list[tuple[str, nn.Module]], name: str) -> dict[str, Entry]:
    """File key -> Entry for the prompt (`prompt`) and the planned modules_to_save (`saved`)."""
    return {PROMPT_KEY: prompt, **saved_modules.entries(saved, name, SAVED_PREFIX)}


def load(model: nn.Module, saved: SavedAdapter, name: str, expected: dict[str, Entry], method: str,
         put_prompt: Callable[[torch.Tensor], None], remove: Callable[[nn.Module, str], None]) -> Callable[[], None]:
    """Check the file against `expected`, then `put_prompt(the file's prompt)` and copy the modules_to_save in;
    returns the function that undoes the load (run here when a step fails)."""
    check_tensors(expected, saved.tensors, f"{saved.weights_path} does not fit the {method} of {type(model).__name__}")

    def undo():
        remove(model, name)
        saved_modules.delete(model, name)
    try:
        put_prompt(saved.tensors[PROMPT_KEY])
        saved_modules.copy_in(model, name, saved.tensors, SAVED_PREFIX)
    except BaseException:
        undo()
        raise
    return undo
