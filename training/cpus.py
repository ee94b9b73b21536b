"""How many CPUs this process may really use. Standard library only: the service's settings
read it before PyTorch loads (so `python -m app --help` answers at once)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask and, in a container, its cgroup's CPU
    quota (`docker run --cpus 2`), both of which os.cpu_count() ignores; threads beyond them
    only wait for one another."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup v2 quota here
        pass
    return max(1, count)
