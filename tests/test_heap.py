"""fastpeft.heap: memory a training step frees stays in the process, so the next step does not fault it in again."""
import platform
import subprocess
import sys

import pytest

# Allocates and frees 64 MiB in 8 MiB blocks three times (one step's activations, three steps), then prints the page
# faults of the third round: glibc's default trims the freed heap top, so its pages must be faulted in again.
ROUNDS = """
import resource, sys, torch
from fastpeft.heap import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap() and keep_freed_heap()
def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    blocks = [torch.ones(2 << 20) for _ in range(8)]
    del blocks
start = page_faults()
blocks = [torch.ones(2 << 20) for _ in range(8)]
print(page_faults() - start)
"""
PAGES_OF_64_MIB = 64 * 2**20 // 4096


def third_round_page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_heap tunes glibc's malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    assert third_round_page_faults("default") > PAGES_OF_64_MIB // 2  # the premise: glibc alone gives the heap back
    assert third_round_page_faults("keep") < PAGES_OF_64_MIB // 50

