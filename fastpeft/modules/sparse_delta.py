"""`SparseDeltaLinear`: diff pruning's fixed-mask stage on one nn.Linear or GPT-2 Conv1D: y = x (W0 + delta)^T + b
with delta nonzero only at `indices` (flat positions in the *stored* weight, sorted), where it is `values`.

Only `values` (fp32) is a parameter, so optimizer state is O(nnz). While merged (the default) the base weight holds
W0 + delta at the mask, rounded once from fp32, so the forward and dx are the plain base GEMMs and the values'
gradient is an SDDMM (fastpeft.ops.sparse_delta). `base_values` keeps W0's exact entries at the mask: unmerge
writes them back bit for bit, and every scatter computes base_values + values, never weight + something.
"""
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from fastpeft import backends
from fastpeft.modules.linear import is_conv1d, linear_features
from fastpeft.ops import checks
from fastpeft.ops.sparse_delta import (check_index_tensor, check_indices, index_dtype, scatter_delta_,
                                       scatter_delta_ref, sparse_delta_linear, sparse_delta_linear_ref)

# When must a merged layer scatter `values` into its weight again? Three things change `values`:
#  - an in-place op through autograd's view of the tensor (SGD, foreach / for-loop Adam, load_state_dict's copy_,
#    `with torch.no_grad(): values.add_(...)`): it bumps `values._version`;
#  - a new tensor (model.to(), load_state_dict(assign=True), `layer.values = ...`): its data_ptr differs;
#  - an optimizer step by a fused kernel (`AdamW(fused=True)`): it bumps no version counter (checked with
#    torch 2.13), so the count of steps of the optimizers holding `values` (a global step hook) is part of the key.
# A forward scatters when (data_ptr, _version, steps) differs from the last scatter's. A scatter bumps the weight's
# version, which breaks two forwards before one backward (the first graph saved the weight), so only a change of
# `values` may cause one: not a step of an optimizer of other parameters. Writes through `values.data` outside an
# optimizer step are not seen: use no_grad ops.
_steps = WeakIdKeyDictionary()  # values parameter -> steps taken by optimizers holding it


def _count_step(optimizer, args, kwargs) -> None:
    if not _steps:  # no fixed-mask layer alive: every other optimizer's step costs nothing here
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in _steps:
                _steps[p] += 1


register_optimizer_step_post_hook(_count_step)


def _sync_before_state_dict(module, prefix, keep_vars) -> None:
    module.sync()  # a state_dict holds the trained weight, not the one of the last forward


def _restore_after_load(module, incompatible_keys) -> None:
    module.restore_weight()  # the loaded weight holds W0 + delta (a state_dict syncs), or W0, at the mask


class SparseDeltaLinear(nn.Module):
    """Wraps `base_layer` (its weight is shared, not copied, and frozen) with a fixed-mask sparse delta. `indices`:
    strictly increasing flat positions in the stored weight (Conv1D: [in, out]); `values`: the delta there
    (default zeros), kept as an fp32 parameter. The layer is built merged."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(f"SparseDeltaLinear wraps nn.Linear or transformers' Conv1D, got "
                            f"{type(base_layer).__name__}")
        self.in_features, self.out_features = linear_features(base_layer)
        weight = base_layer.weight
        checks.check_tensor("base_layer.weight", weight, dim=2)
        if not weight.is_contiguous():
            raise ValueError("base_layer.weight must be contiguous (indices are flat positions in it)")
        check_index_tensor(indices, weight.device, "the base weight")
        check_indices(indices, weight.numel())
        if values is None:
            values = torch.zeros(indices.shape, dtype=torch.float32, device=weight.device)
        checks.check_tensor("values", values, shape=tuple(indices.shape))
        if values.device != weight.device:
            raise ValueError(f"values is on {values.device} but the base weight is on {weight.device}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.register_buffer("indices", indices.to(index_dtype(weight.numel()), copy=True))
        self.register_buffer("base_values", weight.detach().view(-1)[self.indices.long()])  # a gather: a copy
        self.values = nn.Parameter(values.detach().to(torch.float32, copy=True))
        self.merged = False
        self.disabled = False  # True (only while unmerged): the base layer alone runs (disable_adapters)
        self._scattered = None  # the key of the values last scattered (see the comment at _steps)
        self.merge()
        self.register_state_dict_pre_hook(_sync_before_state_dict)
        self.register_load_state_dict_post_hook(_restore_after_load)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.base_layer.weight.numel(), 1)

    def delta_weight(self) -> torch.Tensor:
        """The dense delta in fp32, the stored weight's shape (for inspection; training never builds it)."""
        weight = self.base_layer.weight
        flat = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
        return flat.index_copy_(0, self.indices.long(), self.values.detach().float()).view(weight.shape)

    # --- merge ------------------------------------------------------------------------------------------------
    def _values_key(self) -> tuple:
        if self.values not in _steps:  # a new tensor (its data_ptr differs too)
            _steps[self.values] = 0
        return self.values.data_ptr(), self.values._version, _steps[self.values]

    @torch.no_grad()
    def _scatter(self) -> None:
        scatter_delta_(self.base_layer.weight, self.base_values, self.values.detach(), self.indices)
        self._scattered = self._values_key()

    def sync(self) -> None:
        """Bring a merged base weight up to date with `values` (scattered lazily: forward and state_dict call this;
        call it before reading the base weight any other way)."""
        if self.merged and self._scattered != self._values_key():
            self._scatter()

    def merge(self) -> None:
        """Write W0 + delta (summed in fp32, rounded once) into the base weight at the mask."""
        if self.merged:
            raise ValueError("the sparse delta is already merged; unmerge() first")
        self._scatter()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight's exact original bits at the mask (from base_values)."""
        if not self.merged:
            raise ValueError("unmerge() called on a layer whose sparse delta is not merged")
        self.merged = False
        self.restore_weight()

    @torch.no_grad()
    def restore_weight(self) -> None:
        """Make the base weight at the mask what this layer's state says (base_values + values when merged,
        base_values when not), whatever it holds now, e.g. after load_state_dict."""
        if self.merged:
            self._scatter()
        else:
            self.base_layer.weight.view(-1).index_copy_(0, self.indices.long(), self.base_values)
            self._scattered = None

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.disabled:  # disable_adapters unmerged the layer first: the weight is W0
            return self.base_layer(x)
        if not self.merged:  # the weight is W0: the reference path adds the delta (correct, slower)
            return sparse_delta_linear_ref(x, weight, bias, self.values, self.indices, self.fan_in_fan_out)
        if torch.compiler.is_compiling() or self.__dict__.get("_is_fsdp_managed_module", False):
            # FSDP (fully_shard marks the modules it manages) gathers the base weight from its shards for the
            # forward and again for the backward, so a delta scattered into the forward's copy would be missing
            # from the backward's; torch.compile cannot trace sync()'s host-side check. Both merge out of place:
            # the scatter's numbers in a copy of the weight, the values' gradient still the SDDMM.
            merged = scatter_delta_ref(weight.detach().clone(), self.base_values, self.values.detach(), self.indices)
            return sparse_delta_linear(x, merged, bias, self.values, self.indices, self.fan_in_fan_out)
        self.sync()
        return sparse_delta_linear(x, weight, bias, self.values, self.indices, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nnz={self.nnz}, density={self.density:.4g}, "
                f"merged={self.merged}, backend={backends.requested()}")

