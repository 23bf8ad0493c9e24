"""`LoraConfig`: PEFT's LoRA config fields (so configs and `adapter_config.json` files carry over), validated on
creation, and its conversion to and from the dict that peft 0.22 writes."""
import re
from dataclasses import dataclass, field, fields, replace

from fastpeft.methods.config import (PEFT_FORMAT_VERSION, SEQ_CLS_HEADS, TASK_TYPES, check_pattern, construct,
                                     names, normalise_targets, refuse_nulls)
from fastpeft.modules import lora_args

BIASES = ("none", "all", "lora_only")
# PEFT's init_lora_weights values; fastpeft can initialise the first three itself, the others only load trained weights.
INITS_SUPPORTED = (True, False, "gaussian")
INITS_PEFT = ("eva", "olora", "pissa", "corda", "astra", "loftq", "orthogonal", "mica", "nora")

# The remaining keys of peft 0.22's LoraConfig.to_dict(), at their defaults.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "astra_config": None, "auto_mapping": None, "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_bias": False, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None, "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "revision": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False, "velora_config": None,
}
# PEFT features that change what the adapter computes; a file that turns one on is refused, never half-loaded.
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "exclude_modules",
                    "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
                    "alora_invocation_tokens", "arrow_config", "use_bdlora", "megatron_config", "kasa_config",
                    "monteclora_config", "velora_config")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters under PEFT's names. `target_modules`: module-name suffixes (`["query", "value"]`), a
    regex fully matched against module paths, or `"all-linear"`. `rank_pattern` / `alpha_pattern` override r /
    lora_alpha per module (keys are regexes matched against the end of the module path, as in PEFT)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        lora_args.check_rank("r", self.r)
        lora_args.check_alpha("lora_alpha", self.lora_alpha)
        lora_args.check_dropout("lora_dropout", self.lora_dropout)
        object.__setattr__(self, "target_modules", normalise_targets(self.target_modules))
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if not _known_init(self.init_lora_weights):
            raise ValueError(f"init_lora_weights must be True, False, 'gaussian' or one of PEFT's {INITS_PEFT}, "
                             f"got {self.init_lora_weights!r}")
        for key, value in self.rank_pattern.items():
            check_pattern("rank_pattern", key)
            lora_args.check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_pattern("alpha_pattern", key)
            lora_args.check_alpha(f"alpha_pattern[{key!r}]", value)
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")

    def with_task_heads(self) -> "LoraConfig":
        """As PEFT's SEQ_CLS model wrapper does: the (new, untrained) classification head joins modules_to_save."""
        if self.task_type != "SEQ_CLS":
            return self
        have = tuple(self.modules_to_save or ())
        return replace(self, modules_to_save=have + tuple(n for n in SEQ_CLS_HEADS if n not in have))

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """r and lora_alpha of one module: the first matching rank_pattern / alpha_pattern key, else r / lora_alpha."""
        return (_pattern_value(self.rank_pattern, module_path, self.r),
                _pattern_value(self.alpha_pattern, module_path, self.lora_alpha))

    def to_peft_dict(self, **overrides) -> dict:
        """The dict peft's `save_pretrained` writes as adapter_config.json (`overrides` set e.g. fan_in_fan_out)."""
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("target_modules", "modules_to_save"):
            if isinstance(own[name], tuple):
                own[name] = list(own[name])
        own["rank_pattern"], own["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        unknown = set(overrides) - set(PEFT_DEFAULTS) - set(own)
        if unknown:
            raise ValueError(f"not keys of a PEFT LoRA config: {sorted(unknown)}")
        return {**PEFT_DEFAULTS, **own, **overrides}

    @classmethod
    def from_peft_dict(cls, config: dict, source: str = "adapter config") -> "LoraConfig":
        """Read a PEFT adapter config dict; PEFT-only keys are ignored unless they turn on a feature fastpeft lacks."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type is {config.get('peft_type')!r}; fastpeft loads 'LORA' adapters")
        turned_on = {key: config[key] for key in PEFT_UNSUPPORTED if config.get(key)}
        if turned_on:
            raise ValueError(f"{source} uses PEFT features fastpeft does not support: {turned_on}")
        if config.get("target_modules") is None:
            raise ValueError(f"{source}: target_modules is missing or null")
        refuse_nulls(cls, config, source, allowed=("rank_pattern", "alpha_pattern"))  # null there: no pattern
        known = {f.name for f in fields(cls)}
        kwargs = {key: value for key, value in config.items() if key in known and value is not None}
        kwargs.setdefault("rank_pattern", {})
        kwargs.setdefault("alpha_pattern", {})
        return construct(cls, kwargs, source)

    def replace(self, **changes) -> "LoraConfig":
        """A copy with `changes`, validated again."""
        return replace(self, **changes)


def _known_init(init) -> bool:
    if isinstance(init, bool):
        return True
    return isinstance(init, str) and (init == "gaussian" or init in INITS_PEFT or init.startswith("pissa_niter_"))


def _pattern_value(pattern: dict, module_path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
