"""The host's memory, as the kernel will enforce it: the machine's RAM or a container's cgroup limit."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def ram_bytes() -> int:
    """The RAM this machine, or the container it runs in, allows (cgroup v2, then v1: what the OOM killer enforces)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_LIMITS:
        try:
            ram = min(ram, int(limit.read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return ram


def available_bytes() -> int:
    """What can be allocated now without evicting others: MemAvailable, within the cgroup's limit."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return min(available, ram_bytes())
