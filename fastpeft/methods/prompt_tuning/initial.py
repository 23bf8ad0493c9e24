"""The prompt's first values, as PEFT's PromptEmbedding sets them: N(0, 1) ("RANDOM", nn.Embedding's init), the word
embeddings of random vocabulary tokens ("SAMPLE_VOCAB"), or of the init text's tokens ("TEXT"), repeated and cut to
num_virtual_tokens. A load starts from zeros instead (the file's values replace them)."""
import math

import torch
from torch import nn

from fastpeft.methods.prompt_tuning.config import PromptTuningConfig


def initial_prompt(config: PromptTuningConfig, embeddings: nn.Embedding, dtype: torch.dtype) -> torch.Tensor:
    """[num_virtual_tokens, token_dim] on the embeddings' device, in `dtype`."""
    n, weight = config.num_virtual_tokens, embeddings.weight
    if config.prompt_tuning_init == "RANDOM":
        return torch.randn(n, config.token_dim, device=weight.device).to(dtype)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, weight.shape[0], (n,)).tolist()
    else:
        ids = text_token_ids(config, weight.shape[0])
        ids = (ids * math.ceil(n / len(ids)))[:n]
    with torch.no_grad():
        values = embeddings(torch.tensor(ids, device=weight.device))
    return values.detach().float().to(dtype)  # PEFT goes through float32 as well


def text_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    """The init text's token ids (with the tokenizer's special tokens, as PEFT tokenises it)."""
    from transformers import AutoTokenizer  # only the TEXT init needs it
    # As PEFT: never trust_remote_code, which a saved config could otherwise turn on
    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r}: no tokenizer could be loaded "
                         f"from it: {e}") from e
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens")
    if max(ids) >= vocab_size:
        raise ValueError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives token id {max(ids)} for "
                         f"prompt_tuning_init_text, beyond the model's {vocab_size} word embeddings: not its tokenizer")
    return ids
