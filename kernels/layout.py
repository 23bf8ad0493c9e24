"""What the launchers guarantee the kernels about their operands' layout.

The kernels index rows with int64 offsets but columns with int32 ones (and step pointers by BLOCK * column
stride in int32), and read 1-D operands (biases, index and value vectors) at unit stride. The launchers pass
their operands through these helpers, which copy only the rare layouts that break those assumptions.
"""
import torch

INT32_LIMIT = 2**31
COLUMN_MARGIN = 1024  # column offsets are formed up to one block (<= 256 columns) past the last column


def int32_columns(t: torch.Tensor) -> torch.Tensor:
    """A 2-D `t` itself when its column offsets fit int32, else a contiguous copy (column stride 1), e.g. for a
    column-major view of a huge buffer."""
    if (t.shape[1] + COLUMN_MARGIN) * abs(t.stride(1)) < INT32_LIMIT:
        return t
    return t.contiguous()


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D `t` at unit stride (a copy when it is a strided view), None kept None."""
    return None if t is None else t.contiguous()
