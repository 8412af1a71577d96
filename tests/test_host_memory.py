"""On glibc, memory a CPU training step frees mid-step goes back to the OS when lorachat asks (train/host_memory.py)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from lora_chat.train.host_memory import release_freed


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_blocks_freed_in_the_middle_of_the_heap_are_returned():
    big = torch.ones(8 * 2**18)  # an 8 MB block, freed: glibc's mmap threshold rises, and MB blocks come from its heap
    del big
    blocks = [torch.ones(2**18) for _ in range(200)]  # 200 x 1 MB, touched
    last = blocks[-1]  # keeps the heap's top in use, so glibc's own trimming at free cannot reach the rest
    del blocks
    held = _rss_mb()
    release_freed()
    assert held - _rss_mb() > 100, "the freed blocks stayed resident"
    assert last.sum() == 2**18
