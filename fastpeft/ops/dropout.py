"""Counter-based dropout masks shared by every backend.

An element at logical position (row, col) of the flattened `[M, K]` input is kept iff
`hash(seed, row, col) >= threshold(p)`, with
    hash = mix32(mix32(row ^ seed) + col * 0x9E3779B9)      (all arithmetic mod 2**32)
where mix32 is MurmurHash3's finalizer (a bijection of uint32 with full avalanche), and
`threshold(p) = floor(p * 2**32)`, so the keep-probability is 1 - p to within 2**-32.
The Triton kernels and the C++ extension compute the same bits, so a backward pass regenerates the
forward's mask from `(seed, offset)` and nothing of size `[M, K]` is saved; tests compare every backend
against a reference that uses this very mask.
"""
import torch
import torch.distributed as dist

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
MIX_C1 = 0x85EBCA6B
MIX_C2 = 0xC2B2AE35
SEED31 = 0x7FFFFFFF  # drawn seeds are 31-bit


def keep_threshold(p: float) -> int:
    """uint32 threshold under which a hash drops its element."""
    return min(int(p * 2.0**32), MASK32)


def seed_tensor(seed: int | None, p: float) -> torch.Tensor:
    """The seed that the kernels take, a 0-d int64 CPU tensor: `seed`, or when None (and p > 0) a fresh 31-bit one
    from torch's CPU generator, so `torch.manual_seed` governs it. A tensor, not an int: under torch.compile the
    draw is then an op of the graph, made anew on every call, not an `.item()` that splits the graph.
    Under torch.distributed a drawn seed is scrambled with the rank (rank 0 keeps it): data-parallel ranks seeded
    alike (as Trainer and accelerate seed them) hold different rows of the global batch, whose masks must be
    independent, as two rows of one process's batch are, while the generator itself stays in step on every rank."""
    if seed is None:
        if p <= 0.0:
            return _NO_SEED
        drawn, key = torch.randint(0, 2**31 - 1, (), device="cpu"), _rank_key()
        return _mix32(drawn ^ key) & SEED31 if key else drawn
    return torch.tensor(int(seed), dtype=torch.int64, device="cpu")


def _rank_key() -> int:
    """0 in one process and on rank 0; on rank r, a fixed 31-bit scramble of r (mix32 maps only 0 to 0)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return _mix32(dist.get_rank()) & SEED31


_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed of calls without dropout: no tensor made per call


def _mix32(h: torch.Tensor) -> torch.Tensor:
    # int64 holds uint32 values; products wrap in two's complement and `& MASK32` keeps the low 32 bits.
    h = h ^ (h >> 16)
    h = (h * MIX_C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * MIX_C2) & MASK32
    return h ^ (h >> 16)


def dropout_hash(seed: int | torch.Tensor, rows: int, cols: int, device=None) -> torch.Tensor:
    """The uint32 hash (as int64) of every position of a `[rows, cols]` input."""
    row = torch.arange(rows, device=device, dtype=torch.int64)
    col = torch.arange(cols, device=device, dtype=torch.int64)
    row_key = _mix32(row ^ (seed & MASK32))  # an int, or a CPU tensor seed, which stays a scalar on any device
    return _mix32((row_key[:, None] + ((col * GOLDEN32) & MASK32)[None, :]) & MASK32)


def keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean `[rows, cols]` mask of the kept elements for drop probability `p`."""
    return dropout_hash(seed, rows, cols, device) >= keep_threshold(p)


def dropout_ref(x2d: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the shared mask: kept elements scaled by 1/(1-p)."""
    if p == 0.0:
        return x2d
    mask = keep_mask(seed, x2d.shape[0], x2d.shape[1], p, x2d.device)
    return x2d * mask.to(x2d.dtype) * (1.0 / (1.0 - p))
