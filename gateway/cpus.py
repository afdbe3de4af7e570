"""How many cores this process may use, for the defaults sized by them (decoder processes, sign-in
threads, calibration threads): its CPU affinity, and a container's CPU limit where one is lower.
``os.cpu_count()`` counts the host's cores, 64 on a node whose pod may use 4."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus"]

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2's CPU limit: "<quota> <period>" in microseconds, or "max <period>" for none."""


def available_cpus(cpu_max: Path = CPU_MAX) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a file not as described
        pass
    return max(1, cores)
