"""`LoraLinear`: a drop-in replacement for `nn.Linear` (or transformers' GPT-2 `Conv1D`) with fused LoRA adapters.

The base layer is wrapped, not copied, and stays frozen. Several named adapters can live on one layer; one is
active at a time. Parameters follow PEFT's layout: `lora_A[name]` is [r, in], `lora_B[name]` is [out, r]. They are
in the base weight's dtype unless `dtype` says otherwise: float32 on a bfloat16 / float16 base keeps fp32 master
weights (PEFT's `autocast_adapter_dtype`), cast to the base dtype for each forward, so that the optimizer's small
updates are not rounded away.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastpeft import backends
from fastpeft.modules import lora_args
from fastpeft.modules.linear import is_conv1d, linear_features
from fastpeft.ops.lora import lora_linear

INITS = ("default", "gaussian", "zeros")


@dataclass(frozen=True)
class LoraSettings:
    """Per-adapter hyper-parameters of one layer."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", adapter_name: str = "default",
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear_features(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.settings: dict[str, LoraSettings] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        # The exact pre-merge weight, for bit-exact unmerge; a buffer so model.to() moves it along.
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.merged_adapter: str | None = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init, dtype)
        # Frozen only once add_adapter has validated everything: a refused layer leaves the caller's as it was.
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "default", adapter_name: str = "default",
                    dtype: torch.dtype | None = None) -> "LoraLinear":
        """Wrap `linear` (its weight is shared, not copied) with one adapter, whose weights are in `dtype` (default:
        the base weight's)."""
        return cls(linear, r, lora_alpha, lora_dropout, use_rslora, init, adapter_name, dtype)

    # --- adapters -------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "default", dtype: torch.dtype | None = None) -> None:
        """Add adapter `name`, its weights in `dtype` (default: the base weight's), and make it active."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
        if name in self.settings:
            raise ValueError(f"adapter_name {name!r} already exists on this layer (have {sorted(self.settings)})")
        lora_args.check_rank("r", r)
        lora_alpha = lora_args.check_alpha("lora_alpha", lora_alpha)
        lora_dropout = lora_args.check_dropout("lora_dropout", lora_dropout)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating point torch.dtype or None, got {dtype!r}")
        weight = self.weight
        dtype = dtype or weight.dtype
        self.lora_A[name] = nn.Parameter(weight.new_empty(r, self.in_features, dtype=dtype))
        self.lora_B[name] = nn.Parameter(weight.new_empty(self.out_features, r, dtype=dtype))
        self.settings[name] = LoraSettings(r, lora_alpha, lora_dropout, bool(use_rslora))
        self.reset_adapter(name, init)
        self.active_adapter = name

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "default") -> None:
        """PEFT's initialisations: A Kaiming-uniform (a=sqrt(5)) or Gaussian(1/r), B zero, so the adapter starts as
        the identity; "zeros" zeroes both (used before loading weights)."""
        a, b = self.lora_A[name], self.lora_B[name]
        if init == "default":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.settings[name].r)
        else:
            nn.init.zeros_(a)
        nn.init.zeros_(b)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before deleting it")
        del self.lora_A[name], self.lora_B[name], self.settings[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.settings), None)

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` active; None runs the base layer alone."""
        if name is not None:
            self._require(name)
        if self.merged_adapter is not None and self.merged_adapter != name:
            raise ValueError(f"adapter {self.merged_adapter!r} is merged; unmerge() before switching to {name!r}")
        self.active_adapter = name

    def _require(self, name: str) -> None:
        if name not in self.settings:
            raise ValueError(f"unknown adapter {name!r}; this layer has {sorted(self.settings)}")

    # --- weights --------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as stored (Conv1D: [in, out]), as PEFT's layers expose it (transformers reads
        `lm_head.weight`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name: str, value) -> None:
        # Assigning weight / bias (transformers' tie_weights re-ties lm_head.weight) goes to the base layer;
        # nn.Module would refuse a parameter named like the properties.
        if name in ("weight", "bias") and "base_layer" in self._modules:
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight in [out, in] orientation (a transposed view for Conv1D, never a copy)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A in fp32, [out, in]."""
        s = self.settings[name].scaling
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * s

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @torch.no_grad()
    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weight in place: the delta in fp32, rounded once."""
        name = adapter_name or self.active_adapter
        if self.merged:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged; unmerge() first")
        if name is None:
            raise ValueError("no adapter to merge: this layer has none")
        self._require(name)
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().clone()
        delta = self.delta_weight(name)
        merged = weight.float() + (delta.t() if self.fan_in_fan_out else delta)
        weight.copy_(merged)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly (from the copy kept at merge time, never by subtracting a delta)."""
        if not self.merged:
            raise ValueError("unmerge() called on a layer with no merged adapter")
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged_adapter = None

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.disabled and self.merged:  # the base layer holds W + delta: run the kept original weight
            original = self._unmerged_weight.t() if self.fan_in_fan_out else self._unmerged_weight
            return nn.functional.linear(x, original, self.base_layer.bias)
        if self.disabled or self.merged or name is None:
            return self.base_layer(x)
        settings, weight = self.settings[name], self.weight_out_in()
        lora_a, lora_b = self.lora_A[name].to(weight.dtype), self.lora_B[name].to(weight.dtype)  # no-ops if equal
        return lora_linear(x, weight, self.base_layer.bias, lora_a, lora_b, settings.scaling, settings.lora_dropout,
                           self.training)

    def extra_repr(self) -> str:
        name = self.active_adapter
        if name is None:
            return f"in={self.in_features}, out={self.out_features}, adapters=none"
        s = self.settings[name]
        return (f"in={self.in_features}, out={self.out_features}, adapter={name!r}, r={s.r}, alpha={s.lora_alpha:g}, "
                f"dropout={s.lora_dropout:g}, rslora={s.use_rslora}, merged={self.merged_adapter or False!r}, "
                f"backend={backends.requested()}")
