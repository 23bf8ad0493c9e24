"""Autocast at the fused ops' entry points, as nn.Linear has it: under `torch.autocast(device_type, dtype)` an op's
float32 / float16 / bfloat16 tensors are cast to autocast's dtype (float64 stays, as autocast leaves it), so the op
computes in that dtype (fp32 accumulation) and returns it, and it saves for backward the cast tensors, never an fp32
copy of its input. The ops then see only tensors of one dtype, on which autocast's own casts are no-ops."""
import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def cast(*tensors):
    """`tensors` with the castable ones in autocast's dtype for the first one's device, or unchanged outside
    autocast (None and non-tensors pass through, for the op's validation to name)."""
    if not torch._C._is_any_autocast_enabled():  # one C call, the common case: no `.device` read per op call
        return tensors
    first = tensors[0]
    if not (isinstance(first, torch.Tensor) and torch.is_autocast_enabled(first.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t for t in tensors)
