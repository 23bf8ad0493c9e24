"""Memory layouts of test inputs: the fast paths must not assume contiguous tensors."""
import torch


def with_layout(x: torch.Tensor, layout: str, dtype) -> torch.Tensor:
    """`x` cast to `dtype` in the memory layout the case asks for (a view that is not contiguous)."""
    if layout == "strided":  # every other column of a wider buffer
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype, device=x.device)
        buf[..., ::2] = x
        return buf[..., ::2]
    if layout == "transposed":  # rows are the fast dimension
        return x.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.to(dtype)
