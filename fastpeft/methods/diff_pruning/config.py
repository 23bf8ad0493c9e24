"""`DiffPruningConfig`: diff pruning (Guo, Rush & Kim 2021), validated on creation, and its conversion to and from
the dict saved as `adapter_config.json`."""
import math
from dataclasses import dataclass

from fastpeft.methods.config import MethodConfig, names, normalise_targets
from fastpeft.modules.hard_concrete import check_gate_options

METHOD = "diff_pruning"  # the "method" key of adapter_config.json
SCOPES = ("per_weight", "global")


@dataclass(frozen=True)
class DiffPruningConfig(MethodConfig):
    """`target_modules` as LoraConfig's (name suffixes, a regex fully matching module paths, or "all-linear").
    Stage 1 (search) trains a dense diff per target with hard-concrete gates (`temperature`, `stretch` = (l, r),
    `log_alpha_init`; `structured` adds one gate per weight) under `l0_weight` times the expected fraction of
    nonzero diff entries (see diff_inject.l0_penalty). `project_to_density` then keeps `density` of the entries,
    the largest |gated diff| of each weight (`scope="per_weight"`) or of all targets together (`"global"`), and
    stage 2 trains only those. `modules_to_save` are trained in full (e.g. a classifier head)."""

    METHOD = METHOD
    LABEL = "diff pruning"

    target_modules: tuple[str, ...] | str | None = None
    density: float = 0.005
    scope: str = "per_weight"
    temperature: float = 1.0
    stretch: tuple[float, float] = (-1.5, 1.5)
    log_alpha_init: float = 5.0
    structured: bool = False
    l0_weight: float = 1.0
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", normalise_targets(self.target_modules))
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or \
                not 0 < self.density <= 1:
            raise ValueError(f"density (the fraction of diff entries kept) must be a number in (0, 1], "
                             f"got {self.density!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        _, low, high, _ = check_gate_options(self.temperature, self.stretch, self.log_alpha_init)
        object.__setattr__(self, "stretch", (low, high))  # JSON gives a list
        if not isinstance(self.structured, bool):
            raise TypeError(f"structured must be a bool, got {self.structured!r}")
        if isinstance(self.l0_weight, bool) or not isinstance(self.l0_weight, (int, float)) or \
                not math.isfinite(self.l0_weight) or self.l0_weight < 0:
            raise ValueError(f"l0_weight must be a finite number >= 0, got {self.l0_weight!r}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")
