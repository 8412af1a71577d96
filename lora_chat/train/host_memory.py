"""Freed host memory handed back to the OS mid-step, where glibc would keep it (a CPU run's RSS is its peak).

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which activation-sized
blocks come from its heap and stay resident once freed, to be reused only by allocations that fit the holes. A
step that runs several passes of different shapes (preference tuning's two sides, pair_passes.py) then holds
each pass's leftovers beside the next pass's tensors. `malloc_trim(0)` returns every free page of the heap to
the OS (madvise), at the cost of a walk over glibc's free lists and a page fault for every page taken again.
Measured with `bench/bench_dpo.py --quick` (DPO peak RSS against SFT's on the same rows; tokens/s against TRL's):
two passes alone 1.24x (2.73x); trimmed after the pass without gradients 1.18x (2.78x), which pair_passes.py
does; trimmed after the chosen side's backward too 1.14x, but 1.31x (the rejected pass faults every block back
in). Once a step, as SFT would, it changes nothing (1538 against 1557 MB): the peak is inside the step.
Where the C library has no malloc_trim (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed() -> None:
    """Return the heap's free pages to the OS; a no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
