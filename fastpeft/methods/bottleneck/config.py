"""`BottleneckConfig`: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022's parallel
adapter), validated on creation, and its conversion to and from the dict saved as `adapter_config.json`."""
import warnings
from dataclasses import dataclass

from fastpeft.methods.config import MethodConfig, names
from fastpeft.modules.adapter import ACTIVATIONS, INITS, check_size_options
from fastpeft.ops import checks

METHOD = "bottleneck"  # the "method" key of adapter_config.json
# Where the adapters go in each transformer layer:
#   houlsby:  on the attention output projection and on the FFN output projection (serial, before residual + norm)
#   pfeiffer: on the FFN output projection only (serial)
#   parallel: beside the FFN, reading its input; scaling * adapter output is added to the FFN output
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


@dataclass(frozen=True)
class BottleneckConfig(MethodConfig):
    """Bottleneck size by `bottleneck` (m) or `reduction_factor` (m = hidden // reduction_factor), exactly one.
    `init`: "near-identity" (small Gaussian weights) or "zero-up" (the up projection zero: exactly the identity);
    by default zero-up for the parallel placement, whose adapter reads the FFN's (normalised) input and adds to its
    output, where small random weights still move the output by percents (He et al.'s code and AdapterHub's parallel
    adapters start at zero too), near-identity for the serial placements as in Houlsby et al.
    `layer_norm` puts a LayerNorm on the adapter's input. `modules_to_save` are trained in full (e.g. a head)."""

    METHOD = METHOD
    OLD_METHODS = ("bottleneck_adapter",)  # what files saved before the rename name the method
    LABEL = "bottleneck adapter"

    placement: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    init: str | None = None
    dropout: float = 0.0
    scaling: float = 1.0
    layer_norm: bool = False
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_size_options(self.bottleneck, self.reduction_factor)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.init is None:
            object.__setattr__(self, "init", "zero-up" if self.placement == "parallel" else "near-identity")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.dropout, bool):
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        checks.check_probability("dropout", self.dropout)
        if isinstance(self.scaling, bool) or checks.check_finite("scaling", self.scaling) == 0:
            raise ValueError(f"scaling must be a finite non-zero number, got {self.scaling!r}")
        if not isinstance(self.layer_norm, bool):
            raise TypeError(f"layer_norm must be a bool, got {self.layer_norm!r}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", names("modules_to_save", self.modules_to_save))
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise TypeError(f"base_model_name_or_path must be a string, got {self.base_model_name_or_path!r}")


class AdapterConfig(BottleneckConfig):
    """The earlier name of BottleneckConfig, kept for one release: it warns, and is a BottleneckConfig otherwise."""

    def __post_init__(self):
        warnings.warn("fastpeft.AdapterConfig is now fastpeft.BottleneckConfig ('adapter' means any method's trained "
                      "state, as in PEFT); the old name goes in the next release", FutureWarning, stacklevel=3)
        super().__post_init__()
