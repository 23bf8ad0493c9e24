"""`PromptTuningConfig`: PEFT's prompt tuning config fields (so configs and `adapter_config.json` files carry over),
validated on creation, filled from the model (token_dim, num_layers, num_attention_heads) as PEFT fills them, and
converted to and from the dict that peft 0.22 writes."""
from dataclasses import dataclass, replace

from fastpeft.methods.config import (MODEL_SIZES, SEQ_CLS_HEADS, TASK_TYPES, PeftFileConfig, names,
                                     peft_defaults)

PEFT_TYPE = "PROMPT_TUNING"  # the peft_type of its PEFT files
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")  # PEFT's PromptTuningInit values
# Prompts go in front of one token sequence: encoder-decoder models (PEFT's 2 submodules) are not supported, and
# question answering's start / end positions would need shifting past the prompt.
UNSUPPORTED_TASKS = ("SEQ_2_SEQ_LM", "QUESTION_ANS")
PEFT_DEFAULTS = peft_defaults(PEFT_TYPE)


@dataclass(frozen=True)
class PromptTuningConfig(PeftFileConfig):
    """Prompt tuning (Lester et al. 2021): `num_virtual_tokens` learned embeddings put in front of the input
    embeddings. `prompt_tuning_init`: "RANDOM" (N(0, 1), PEFT's default), "SAMPLE_VOCAB" (embeddings of random
    vocabulary tokens) or "TEXT" (embeddings of `prompt_tuning_init_text`'s tokens, tokenised by
    `tokenizer_name_or_path`, repeated / cut to num_virtual_tokens). token_dim, num_layers and num_attention_heads
    are filled from the model where not given. With task_type "SEQ_CLS" the classification head trains and is saved
    (modules_to_save)."""

    PEFT_TYPE = PEFT_TYPE
    PEFT_DEFAULTS = PEFT_DEFAULTS

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"num_transformer_submodules must be 1 (fastpeft's prompt tuning prepends to one input; "
                             f"encoder-decoder models are not supported), got {self.num_transformer_submodules!r}")
        object.__setattr__(self, "num_transformer_submodules", 1)
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's str enum, too
        if init not in INITS:
            raise ValueError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        object.__setattr__(self, "prompt_tuning_init", str(init))
        if init == "TEXT":
            for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
                value = getattr(self, name)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"prompt_tuning_init='TEXT' needs {name} (a non-empty string), got {value!r}")
        if self.tokenizer_kwargs is not None and (init != "TEXT" or not isinstance(self.tokenizer_kwargs, dict)):
            raise ValueError(f"tokenizer_kwargs must be a dict, and only with prompt_tuning_init='TEXT'; got "
                             f"{self.tokenizer_kwargs!r} with prompt_tuning_init={init!r}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if self.task_type not in TASK_TYPES or self.task_type in UNSUPPORTED_TASKS:
            supported = tuple(t for t in TASK_TYPES if t not in UNSUPPORTED_TASKS)
            raise ValueError(f"task_type must be one of {supported} for prompt tuning, got {self.task_type!r}")

    def with_task_heads(self) -> "PromptTuningConfig":
        """As PEFT's SEQ_CLS model wrapper does: the (new, untrained) classification head joins modules_to_save."""
        if self.task_type != "SEQ_CLS":
            return self
        have = tuple(self.modules_to_save or ())
        return replace(self, modules_to_save=have + tuple(n for n in SEQ_CLS_HEADS if n not in have))

    def for_model(self, model, embedding_dim: int) -> "PromptTuningConfig":
        """token_dim, num_layers, num_attention_heads and base_model_name_or_path filled from the model where not
        given (as PEFT does); token_dim must be the width of the model's input embeddings."""
        model_config = getattr(model, "config", None)
        model_config = getattr(model_config, "get_text_config", lambda: model_config)()
        found = {name: next((getattr(model_config, key) for key in keys if isinstance(getattr(model_config, key, None),
                                                                                   int)), None)
                 for name, keys in MODEL_SIZES.items() if getattr(self, name) is None}
        config = replace(self, **{name: value for name, value in found.items() if value is not None})
        if config.token_dim is None:
            config = replace(config, token_dim=embedding_dim)
        if config.base_model_name_or_path is None:
            config = replace(config, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
        if config.token_dim != embedding_dim:
            raise ValueError(f"token_dim must be the width of {type(model).__name__}'s input embeddings, "
                             f"{embedding_dim}, got {config.token_dim}")
        return config


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
