"""`MultiTaskConfig`: named task heads on one shared encoder, validated on creation, and its conversion to and from the
dict saved as `adapter_config.json`."""
from dataclasses import dataclass

from torch import nn

from fastpeft.methods.config import MethodConfig
from fastpeft.ops import checks

METHOD = "multitask"  # the "method" key of adapter_config.json
# What each head computes from the encoder's last hidden states, and the loss it is trained with:
#   classification        pooled sequence -> num_labels logits, cross-entropy
#   regression            pooled sequence -> num_labels values (default 1), mean squared error
#   token_classification  every token -> num_labels logits, cross-entropy over labelled tokens (label -100: none)
KINDS = ("classification", "regression", "token_classification")
# How a sequence-level head pools the tokens: the attention-masked mean, the first token ([CLS] in BERT), or the
# last non-padding token (decoders, whose last token has seen the whole input).
POOLINGS = ("mean", "cls", "last")
TASK_KEYS = ("kind", "num_labels")


@dataclass(frozen=True)
class MultiTaskConfig(MethodConfig):
    """`tasks`: task name -> {"kind": one of KINDS, "num_labels": outputs of its head (required for the two
    classification kinds; 1 by default for regression)}. Each task gets a head (dropout, then a linear layer on the
    encoder's last hidden states, pooled by `pooling` for the sequence-level kinds) and a learned log-variance s_t
    that weights its loss (fastpeft.methods.multitask.loss)."""

    METHOD = METHOD
    LABEL = "multi-task"

    tasks: dict | None = None
    dropout: float = 0.1
    pooling: str = "mean"
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", _tasks(self.tasks))
        if isinstance(self.dropout, bool):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        checks.check_probability("dropout", self.dropout)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")


def _tasks(tasks) -> dict[str, dict]:
    """The tasks, each spelled out in full ({"kind", "num_labels"}), in the order given."""
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks must be a non-empty dict of task name -> {{'kind': ..., 'num_labels': ...}}, got "
                         f"{tasks!r}")
    spelled = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
        if hasattr(nn.ModuleDict(), name):  # the heads are held by name in a ModuleDict
            raise ValueError(f"task name {name!r} is an attribute of torch's ModuleDict: choose another")
        if not isinstance(spec, dict) or set(spec) - set(TASK_KEYS):
            raise ValueError(f"tasks[{name!r}] must be a dict with keys {TASK_KEYS}, got {spec!r}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"tasks[{name!r}]['kind'] must be one of {KINDS}, got {kind!r}")
        num_labels = spec.get("num_labels", 1 if kind == "regression" else None)
        if num_labels is None:
            raise ValueError(f"tasks[{name!r}]['num_labels'] is required for kind {kind!r}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"tasks[{name!r}]['num_labels'] must be an int >= 1, got {num_labels!r}")
        spelled[name] = {"kind": kind, "num_labels": num_labels}
    return spelled
