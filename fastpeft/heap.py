"""Keep the memory a CPU training step frees inside the process, so the next step does not fault it in again.

A step allocates its activations in the forward and frees them at the end of the backward. glibc's malloc returns
the top of its heap to the kernel whenever more than its trim threshold lies free there (by default twice the
largest block it has mmapped, a few tens of MiB), and serves blocks above its mmap threshold with fresh mappings
that it unmaps on free. Either way the next forward touches pages the kernel must map and zero again: on this
project's 2-core VM, a first touch of 120 MiB took 105 ms (3.4 us a 4 KiB page). LoRA keeps each adapted layer's
input for the backward (130 MiB more for MiniLM at batch 32x64), which took a step past glibc's threshold: 9-16
thousand page faults a step, HF PEFT's LoRA 130-140 thousand, the frozen floor none.

`keep_freed_heap()` sets glibc's mmap threshold to its largest allowed value and its trim threshold to the
largest `int`, so freed blocks stay in the heap for the next step: the process keeps its peak resident memory
(what a training loop touches every step anyway). fastpeft's training loop calls it; call it yourself before a
loop of your own. Elsewhere than glibc (musl, macOS, Windows) it does nothing and returns False.
"""
import ctypes
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
_MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc refuses a larger one (32 MiB)
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_heap() -> bool:
    """Tell glibc to keep freed memory (blocks up to 32 MiB from the heap, the heap never trimmed); True when
    applied, False when this process's C library is not glibc. Applies once per process."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError, TypeError):  # TypeError: Windows takes no CDLL(None)
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)):
        raise RuntimeError("glibc's mallopt refused the heap settings (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)")
    return True
