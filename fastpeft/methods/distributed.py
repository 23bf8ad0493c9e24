"""Saving an adapter under torch.distributed: which process writes the files, and FSDP2's sharded weights (DTensors)
gathered whole first, so that no file holds one rank's shard. The gather is a collective: with sharded weights every
rank must call the save (rank 0 alone would wait for the others for ever)."""
import torch
import torch.distributed as dist


def is_main_process() -> bool:
    """True in a single process and on rank 0 of torch.distributed: the process that writes adapter files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """`tensors` with every DTensor made whole (an all-gather over its mesh, in the same key order on every rank); with
    `keep` False (a process that writes nothing) each one is dropped once gathered and {} comes back."""
    if not dist.is_available():
        return tensors if keep else {}
    from torch.distributed.tensor import DTensor

    whole = {}
    for key, value in tensors.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            whole[key] = value
    return whole
