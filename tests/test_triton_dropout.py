"""The Triton side of the shared dropout mask: the hash is bit-identical to fastpeft.ops.dropout's, on the CPU
(the kernel's interpreted twin) and on the GPU (compiled), and the launchers' threshold is the reference's."""
import pytest
import torch

pytest.importorskip("triton")

from fastpeft.kernels.dropout import dropout_args, dropout_hash_grid  # noqa: E402
from fastpeft.ops.dropout import dropout_hash, keep_threshold  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, rows, cols", [(0, 37, 70), (1, 1, 1), (12345, 64, 33), (2**31 - 1, 130, 257)])
def test_hash_matches_reference(device, seed, rows, cols):
    assert torch.equal(dropout_hash_grid(seed, rows, cols, device).cpu(), dropout_hash(seed, rows, cols))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9, 1 - 2**-30])
def test_launcher_arguments_match_reference(p):
    seed, like = torch.tensor(7), torch.empty(2, 2)
    seed_arg, threshold, keep_scale, dropout = dropout_args(p, seed, like)
    assert (seed_arg.item(), threshold, keep_scale, dropout) == (7, keep_threshold(p), 1.0 / (1.0 - p), True)
    assert dropout_args(0.0, seed, like) == (like, 0, 1.0, False)  # no dropout: no seed read, no RNG compiled
