"""`TrainableTokensConfig`: PEFT's TrainableTokensConfig fields (token_indices, target_modules, init_weights), validated
on creation, and converted to and from the dict that peft 0.22 writes."""
from dataclasses import dataclass, replace

from fastpeft.methods.config import TASK_TYPES, PeftFileConfig, normalise_targets, peft_defaults

PEFT_TYPE = "TRAINABLE_TOKENS"
PEFT_DEFAULTS = peft_defaults(PEFT_TYPE)


@dataclass(frozen=True)
class TrainableTokensConfig(PeftFileConfig):
    """Train only the rows `token_indices` of the word embeddings (e.g. the new tokens of an extended vocabulary); an
    output layer tied to them follows. `target_modules`: the embedding layer(s) (default: the model's input
    embeddings, as PEFT). `init_weights`: start the rows at their current values (a no-op until trained; PEFT's
    default) or at N(0, 1)."""

    PEFT_TYPE = PEFT_TYPE
    PEFT_DEFAULTS = PEFT_DEFAULTS

    token_indices: tuple[int, ...] = ()
    target_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        indices = self.token_indices
        if isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)) or not indices or \
                not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError(f"token_indices must be a non-empty list of token ids (ints >= 0), got {indices!r}")
        if len(set(indices)) != len(indices):
            twice = sorted({i for i in indices if indices.count(i) > 1})
            raise ValueError(f"token_indices must not repeat a token id, got {twice} more than once")
        object.__setattr__(self, "token_indices", tuple(indices))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", normalise_targets(self.target_modules))
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be True or False, got {self.init_weights!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")

    def to_peft_dict(self, **overrides) -> dict:
        """As peft writes it: token_indices as a list, target_modules as given (a list or a regex / path string)."""
        own = super().to_peft_dict(**overrides)
        own["token_indices"] = list(self.token_indices)
        if isinstance(own["target_modules"], tuple):
            own["target_modules"] = list(own["target_modules"])
        return own

    def for_model(self, model, embeddings_path: str) -> "TrainableTokensConfig":
        """target_modules (the input embeddings' path) and base_model_name_or_path filled in where not given."""
        config = self if self.target_modules is not None else replace(self, target_modules=embeddings_path)
        if config.base_model_name_or_path is None:
            config = replace(config, base_model_name_or_path=getattr(model, "name_or_path", None) or None)
        return config
