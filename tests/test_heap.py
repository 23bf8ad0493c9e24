"""fastpeft.heap: memory a training step frees stays in the process, so the next step does not fault it in again."""
import platform
import subprocess
import sys

import pytest

# Allocates and frees 64 MiB in 8 MiB blocks, one step's activations, for 8 steps, then prints the page faults of the
# last 4. glibc's default trims the freed top of its heap, so every step faults its 16 thousand pages in again,
# except in about a third of processes, where they stay (the heap's layout differs from process to process); kept,
# the heap stops growing within the first three steps, in every process.
STEPS = """
import resource, sys, torch
from fastpeft.heap import keep_freed_heap
if sys.argv[1] == "keep":
    assert keep_freed_heap() and keep_freed_heap()
def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(8):
    if step == 4:
        start = page_faults()
    blocks = [torch.ones(2 << 20) for _ in range(8)]
    del blocks
print(page_faults() - start)
"""


def page_faults_of_4_steps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_heap tunes glibc's malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    # the premise, in the first of up to 5 processes where the layout lets glibc give the memory back
    assert any(page_faults_of_4_steps("default") > 4 * 8000 for _ in range(5))
    assert max(page_faults_of_4_steps("keep") for _ in range(3)) < 100

