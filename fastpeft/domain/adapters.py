"""Saving and loading a domain-adapted model's adapters together: every adapter on the model (e.g. LoRA on the
attention and trainable tokens on the embeddings), each in its own sub-directory in its own (PEFT) format, with the
extended tokenizer beside them; a load resizes a fresh model's embeddings to that tokenizer first."""
import json
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from fastpeft.api import adapter_names, load_adapter, save_adapter

INDEX = "adapters.json"  # the adapter names, in the order they were added (and are loaded)
TOKENIZER = "tokenizer"


def save_adapters(model: nn.Module, tokenizer, directory) -> None:
    """`directory`/<adapter name>/ per adapter, `directory`/tokenizer/, and the index of names."""
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no fastpeft adapters to save (inject or load_adapter first)")
    directory = Path(directory)
    for name in names:
        save_adapter(model, directory / name, adapter_name=name)
    tokenizer.save_pretrained(directory / TOKENIZER)
    (directory / INDEX).write_text(json.dumps({"adapters": names}, indent=2) + "\n")


def load_adapters(model: nn.Module, directory):
    """Load what save_adapters wrote into `model` (its embeddings grown to the saved tokenizer where smaller); returns
    the tokenizer."""
    directory = Path(directory)
    if not (directory / INDEX).is_file():
        raise FileNotFoundError(f"no {INDEX} in {str(directory)!r}: not a directory written by save_adapters")
    tokenizer = AutoTokenizer.from_pretrained(directory / TOKENIZER)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # the new rows' values come from the trainable tokens adapter
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for name in json.loads((directory / INDEX).read_text())["adapters"]:
        load_adapter(model, directory / name, adapter_name=name)
    return tokenizer
