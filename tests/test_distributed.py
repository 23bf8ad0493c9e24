"""Training under torch.distributed on 2 CPU processes (gloo), one torchrun launch of tests/distributed_worker.py for
the module: DDP (also through accelerate) trains LoRA, bottleneck adapters and diff pruning to what one process
computes on the same global batch; FSDP2's sharded LoRA saves as whole tensors that load into one process with the
same outputs, and FSDP2 trains diff pruning's fixed mask as one process does; the stock transformers.Trainer wraps a
LoRA model in DDP and checkpoints its adapter; dropout masks differ between ranks while everything else starts and
stays alike."""
import functools
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastpeft
from tests import distributed_worker as worker
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-6  # fp32 rounding: DDP sums two half-batch gradients where one process sums the whole batch at once


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    """The output directory of one two-rank run of every case of the worker."""
    out = str(tmp_path_factory.mktemp("distributed"))
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={worker.WORLD}",
               "-m", "tests.distributed_worker", out]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@functools.cache
def one_process(method: str) -> tuple[dict, dict]:
    """The trainable parameters before and after the worker's steps on the whole batches, in this process (diff
    pruning: its search)."""
    model = worker.classifier(method)
    start = worker.trained(model)
    worker.train(model, worker.batches(), penalty=fastpeft.l0_penalty if method == "diff_pruning" else None)
    return start, worker.trained(model)


def loaded(directory: str):
    """A fresh model with the adapter saved in `directory`."""
    return fastpeft.load_adapter(worker.base(), directory)


def assert_trained_alike(result: dict, start: dict, reference: dict) -> None:
    """`result` is `reference` to fp32 rounding, and both moved from `start` far beyond that."""
    assert result.keys() == reference.keys()
    for name, value in result.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=ATOL, msg=name)
    assert max((reference[name] - start[name]).abs().max().item() for name in reference) > 100 * ATOL


def rank_files(runs: str, stem: str) -> list[dict]:
    return [load_file(os.path.join(runs, f"{stem}-rank{rank}.safetensors")) for rank in range(worker.WORLD)]


def assert_ranks_alike(ranks: list[dict]) -> None:
    for name, value in ranks[0].items():
        assert all(torch.equal(value, other[name]) for other in ranks[1:]), name


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.parametrize("run, method", [("ddp", "lora"), ("ddp", "bottleneck"), ("accelerate", "lora")])
def test_ddp_trains_as_one_process_on_the_global_batch(runs, run, method):
    ranks = rank_files(runs, f"{run}-{method}")
    assert_ranks_alike(ranks)  # DDP keeps the ranks identical
    assert_trained_alike(ranks[0], *one_process(method))


def test_ddp_diff_pruning_search_and_fixed_mask_match_one_process(runs):
    assert_trained_alike(rank_files(runs, "ddp-diff_pruning-search")[0], *one_process("diff_pruning"))
    model = loaded(os.path.join(runs, "ddp-diff_pruning-projected"))  # from the mask the DDP run projected
    start = worker.trained(model)
    worker.train(model, worker.batches())
    assert_trained_alike(rank_files(runs, "ddp-diff_pruning")[0], start, worker.trained(model))


def test_fsdp2_trains_diff_pruning_fixed_mask_as_one_process_and_saves_it_whole(runs):
    """The fixed-mask layer keeps its delta in the base weight, which FSDP2 gathers anew for the backward: under
    FSDP2 it merges into a copy instead, so training matches one process (large values make a missing delta show)."""
    ranks = rank_files(runs, "fsdp-diff_pruning")
    assert_ranks_alike(ranks)
    model = worker.fixed_mask(runs)
    start = worker.trained(model)
    worker.train(model, worker.batches())
    assert_trained_alike(ranks[0], start, worker.trained(model))
    assert_same_tensors(worker.trained(loaded(os.path.join(runs, "fsdp-diff_pruning"))), ranks[0])


def test_trainer_under_ddp_trains_alike_on_both_ranks_and_checkpoints_the_adapter(runs):
    for rank in range(worker.WORLD):
        with safe_open(os.path.join(runs, f"trainer-lora-rank{rank}.safetensors"), "pt") as f:
            assert f.metadata() == {"world_size": "2", "wrapper": "DistributedDataParallel"}
    ranks = rank_files(runs, "trainer-lora")
    assert_ranks_alike(ranks)  # each rank trained on its half of every global batch
    start = worker.trained(worker.classifier("lora"))
    assert max((ranks[0][name] - start[name]).abs().max().item() for name in start) > 1e-4
    checkpoint = os.path.join(runs, "trainer", f"checkpoint-{worker.STEPS}")
    assert_same_tensors(worker.trained(loaded(checkpoint)), ranks[0])


def test_save_adapter_is_written_by_rank_0_and_needs_no_other_rank_without_sharding(runs):
    assert os.path.isdir(os.path.join(runs, "ddp-lora-rank0-alone"))  # no collective: rank 0 alone did not hang
    assert os.path.isdir(os.path.join(runs, "ddp-lora-called-on-rank0"))
    assert not os.path.exists(os.path.join(runs, "ddp-lora-called-on-rank1"))


def test_fsdp2_saves_whole_tensors_that_load_into_one_process(runs):
    model = loaded(os.path.join(runs, "fsdp-lora"))  # a rank's shard would not fit: half the rows of each weight
    assert_trained_alike(worker.trained(model), *one_process("lora"))
    with torch.no_grad():
        logits = model.eval()(input_ids=worker.batches()[0]["input_ids"]).logits
    torch.testing.assert_close(logits, load_file(os.path.join(runs, "fsdp-lora-logits.safetensors"))["logits"],
                               rtol=0, atol=1e-5)


def test_dropout_masks_differ_between_ranks_and_the_backward_uses_the_forwards(runs):
    ranks = rank_files(runs, "dropout")
    assert torch.equal(ranks[0]["init_A"], ranks[1]["init_A"])  # one manual_seed: the same initial adapter
    for rank in ranks:
        assert torch.equal(rank["forward_kept"], rank["backward_kept"])
        assert 0.4 < rank["forward_kept"].float().mean() < 0.6
    agree = (ranks[0]["forward_kept"] == ranks[1]["forward_kept"]).float().mean()
    assert 0.4 < agree < 0.6  # independent masks agree on about half the elements, as two rows of one batch do
