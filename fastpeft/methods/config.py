"""What every method's config shares: field checks (target_modules, modules_to_save), and for the methods with a file
format of their own (not PEFT's), `MethodConfig`: saved as adapter_config.json holding {"method": <the method's name>,
<the dataclass's fields>} and read back with every value validated again."""
import re
from dataclasses import MISSING, asdict, fields, replace

ALL_LINEAR = "all-linear"
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The heads of transformers' *ForSequenceClassification models, as peft 0.22 lists them (DistilBERT's pre_classifier
# is as new and untrained as its classifier).
SEQ_CLS_HEADS = ("classifier", "score", "pre_classifier")
# The command line's --num-virtual-tokens, one flag for the methods that take it (prompt and prefix tuning).
NUM_VIRTUAL_TOKENS_OPTION = dict(default=20, help="learned virtual tokens: in front of the input (prompt tuning), of "
                                                  "every attention layer's keys and values (prefix tuning)")
# --encoder-method, one flag for the runs that adapt the encoder with a second method beside their own.
ENCODER_METHOD_OPTION = dict(default="lora", help="the method that also adapts the encoder, with its own flags and "
                                                  "their defaults (none: the encoder stays frozen)")
PEFT_FORMAT_VERSION = "0.22.0"  # the peft release whose adapter_config.json layouts fastpeft writes
# Where PEFT reads each size from a transformers config, in its order of preference (prompt and prefix tuning).
MODEL_SIZES = {"num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
               "token_dim": ("hidden_size", "n_embd", "d_model"),
               "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")}


def peft_defaults(peft_type: str) -> dict:
    """The keys of a peft config that fastpeft does not model, at peft's defaults, for the simpler methods (LoRA's
    config has many more)."""
    return {"auto_mapping": None, "inference_mode": True, "peft_type": peft_type,
            "peft_version": PEFT_FORMAT_VERSION, "revision": None}


def check_pattern(name: str, key) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
    try:
        re.compile(key)
    except re.error as e:
        raise ValueError(f"{name} key {key!r} is not a valid regex: {e}") from e


def names(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a list of module names, got {value!r}")
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a non-empty list of non-empty strings, got {value!r}")
    return tuple(sorted(set(value)))


def normalise_targets(targets) -> tuple[str, ...] | str:
    if targets is None:
        raise ValueError("target_modules is required: module-name suffixes (e.g. ['query', 'value']), "
                         "a regex matched against full module paths, or 'all-linear'")
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return ALL_LINEAR
        check_pattern("target_modules", targets)
        return targets
    return names("target_modules", targets)


def refuse_nulls(cls, config: dict, source: str, allowed: tuple[str, ...] = ()) -> None:
    """A JSON null is a value only for a field whose default is None: elsewhere it would silently become the default
    (`"lora_alpha": null` read as alpha 8), so it is an error naming the fields."""
    nulls = sorted(f.name for f in fields(cls) if f.name in config and config[f.name] is None
                   and f.name not in allowed and (f.default is not None or f.default_factory is not MISSING))
    if nulls:
        raise ValueError(f"{source}: {', '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null; give "
                         f"{'a value' if len(nulls) == 1 else 'values'} or leave {'it' if len(nulls) == 1 else 'them'} "
                         "out for the default")


def construct(cls, kwargs: dict, source: str):
    """cls(**kwargs), validated by the config itself; its errors name `source` (the file)."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


class MethodConfig:
    """Mixin for frozen dataclass configs; a subclass sets METHOD (the file's "method") and LABEL (its name in
    errors)."""

    METHOD = ""
    OLD_METHODS: tuple[str, ...] = ()  # earlier names of the method that its files may carry
    LABEL = ""

    def to_dict(self) -> dict:
        """What `save_adapter` writes as adapter_config.json (tuples as JSON lists)."""
        own = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"method": self.METHOD, **own}

    @classmethod
    def from_dict(cls, config: dict, source: str = "adapter config"):
        """Read what `to_dict` wrote; an unknown key or a bad value is an error naming `source`."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("method") not in (cls.METHOD, *cls.OLD_METHODS):
            raise ValueError(f"{source}: method is {config.get('method')!r}, expected {cls.METHOD!r}")
        refuse_nulls(cls, config, source)
        kwargs = {k: v for k, v in config.items() if k != "method"}
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown {cls.LABEL} settings {unknown}")
        return construct(cls, kwargs, source)

    def replace(self, **changes):
        """A copy with `changes`, validated again."""
        return replace(self, **changes)


class PeftFileConfig:
    """Mixin for frozen dataclass configs saved in PEFT's own format (prompt and prefix tuning): a subclass sets
    PEFT_TYPE and PEFT_DEFAULTS (the keys of peft's config that fastpeft does not model, at peft's defaults)."""

    PEFT_TYPE = ""
    PEFT_DEFAULTS: dict = {}

    def to_peft_dict(self, **overrides) -> dict:
        """The dict peft's `save_pretrained` writes as adapter_config.json."""
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        if own.get("modules_to_save") is not None:
            own["modules_to_save"] = list(own["modules_to_save"])
        return {**self.PEFT_DEFAULTS, **own, **overrides}

    @classmethod
    def from_peft_dict(cls, config: dict, source: str = "adapter config"):
        """Read a PEFT adapter config dict; PEFT's bookkeeping keys (peft_version, inference_mode, ...) are ignored."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("peft_type") != cls.PEFT_TYPE:
            raise ValueError(f"{source}: peft_type is {config.get('peft_type')!r}, expected {cls.PEFT_TYPE!r}")
        refuse_nulls(cls, config, source, allowed=("num_transformer_submodules",))  # PEFT fills that one itself
        known = {f.name for f in fields(cls)}
        return construct(cls, {key: value for key, value in config.items() if key in known and value is not None},
                         source)

    def replace(self, **changes):
        """A copy with `changes`, validated again."""
        return replace(self, **changes)
