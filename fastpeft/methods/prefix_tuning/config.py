"""`PrefixTuningConfig`: PEFT's prefix tuning config fields (so configs and `adapter_config.json` files carry over),
validated on creation, filled from the model's config (num_layers, token_dim, num_attention_heads,
encoder_hidden_size) as PEFT fills them, and converted to and from the dict that peft 0.22 writes."""
from dataclasses import dataclass, replace

from fastpeft.methods.config import (MODEL_SIZES, SEQ_CLS_HEADS, TASK_TYPES, PeftFileConfig, names,
                                     peft_defaults)

PEFT_TYPE = "PREFIX_TUNING"
# The prefixes go into the self-attention of one stack: encoder-decoder models (PEFT's 2 submodules) are not supported.
UNSUPPORTED_TASKS = ("SEQ_2_SEQ_LM",)
INIT_WEIGHTS = (None, "zero")  # PEFT's init_weights: random (nn.Embedding's N(0, 1)) or zeros
PEFT_DEFAULTS = peft_defaults(PEFT_TYPE)


@dataclass(frozen=True)
class PrefixTuningConfig(PeftFileConfig):
    """Prefix tuning (Li and Liang 2021): `num_virtual_tokens` learned key / value rows in front of every attention
    layer's keys and values. token_dim is the width of one layer's keys (kv heads x head size), num_attention_heads
    its (key / value) heads; both and num_layers are filled from the model where not given. `prefix_projection`:
    train the prefixes through PEFT's MLP (Embedding [n, token_dim] -> Linear(encoder_hidden_size) -> Tanh -> Linear);
    the saved file holds the plain prefixes either way. With task_type "SEQ_CLS" the classification head trains and
    is saved (modules_to_save)."""

    PEFT_TYPE = PEFT_TYPE
    PEFT_DEFAULTS = PEFT_DEFAULTS

    task_type: str | None = None
    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            if name == "num_virtual_tokens" or getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"num_transformer_submodules must be 1 (fastpeft's prefix tuning adapts one attention "
                             f"stack; encoder-decoder models are not supported), got "
                             f"{self.num_transformer_submodules!r}")
        object.__setattr__(self, "num_transformer_submodules", 1)
        if not isinstance(self.prefix_projection, bool):
            raise TypeError(f"prefix_projection must be a bool, got {self.prefix_projection!r}")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {INIT_WEIGHTS}, got {self.init_weights!r}")
        if self.token_dim is not None and self.num_attention_heads is not None \
                and self.token_dim % self.num_attention_heads:
            raise ValueError(f"token_dim must be a multiple of num_attention_heads ({self.num_attention_heads}), got "
                             f"{self.token_dim}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        task = getattr(self.task_type, "value", self.task_type)  # PEFT's str enum, too
        if task not in TASK_TYPES or task in UNSUPPORTED_TASKS:
            supported = tuple(t for t in TASK_TYPES if t not in UNSUPPORTED_TASKS)
            raise ValueError(f"task_type must be one of {supported} for prefix tuning, got {self.task_type!r}")
        object.__setattr__(self, "task_type", task)

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    def with_task_heads(self) -> "PrefixTuningConfig":
        """As PEFT's SEQ_CLS model wrapper does: the (new, untrained) classification head joins modules_to_save."""
        if self.task_type != "SEQ_CLS":
            return self
        have = tuple(self.modules_to_save or ())
        return replace(self, modules_to_save=have + tuple(n for n in SEQ_CLS_HEADS if n not in have))

    def for_model(self, model) -> "PrefixTuningConfig":
        """num_layers, token_dim, num_attention_heads, encoder_hidden_size and base_model_name_or_path filled from
        the model's config where not given, as PEFT fills them (for grouped-query attention, token_dim and
        num_attention_heads count the key / value heads)."""
        sizes = model_sizes(getattr(model, "config", None))
        config = replace(self, **{k: v for k, v in sizes.items() if getattr(self, k) is None and v is not None})
        missing = [k for k in MODEL_SIZES if getattr(config, k) is None]
        if missing:
            raise ValueError(f"prefix tuning needs {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} "
                             f"in PrefixTuningConfig, {type(model).__name__}'s config has none")
        if config.encoder_hidden_size is None:
            config = replace(config, encoder_hidden_size=config.token_dim)
        if config.base_model_name_or_path is None:
            config = replace(config, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
        return config


def model_sizes(model_config) -> dict:
    """num_layers, token_dim and num_attention_heads as PEFT reads them from a transformers config (None where it has
    none); with num_key_value_heads, the key / value width and heads."""
    if model_config is None:
        return {}
    model_config = getattr(model_config, "get_text_config", lambda: model_config)()
    found = {name: next((getattr(model_config, key) for key in keys
                         if isinstance(getattr(model_config, key, None), int)), None)
             for name, keys in MODEL_SIZES.items()}
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if isinstance(kv_heads, int) and found["token_dim"] and found["num_attention_heads"]:
        head_dim = getattr(model_config, "head_dim", None) or found["token_dim"] // found["num_attention_heads"]
        found["token_dim"], found["num_attention_heads"] = head_dim * kv_heads, kv_heads
    return found


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
