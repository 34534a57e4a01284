"""The cores this process may use (its CPU affinity and its container's CPU quota), and the native thread pools
sized to them before they start.

A container limited to 2 CPUs on a 64-core host sees 64 cores: numpy's OpenBLAS, OpenMP and MKL would each start
64 threads (OpenBLAS allocates a buffer per thread as it starts them, and under an address-space limit one failed
allocation left a command spinning), and the decode pool would start 64 workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
# the variables the native pools read once, when their library loads
POOL_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_quota(root: Path = CGROUP) -> float | None:
    """The CPUs this container may use per second of wall time (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), or None where there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def usable_cpus(root: Path = CGROUP) -> int:
    """The cores this process may use: its affinity, capped by the container's quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def native_pool_settings(environ: Mapping[str, str], root: Path = CGROUP) -> dict[str, str]:
    """The pool sizes to set before numpy or torch load, leaving any the user set: OpenBLAS (numpy's) always gets
    the usable cores; OpenMP and MKL (torch's) only where fewer cores are usable than the host has, since torch's
    own default (the physical cores) is better on a host it has to itself."""
    cpus = usable_cpus(root)
    wanted = POOL_VARIABLES if cpus < (os.cpu_count() or cpus) else POOL_VARIABLES[:1]
    return {name: str(cpus) for name in wanted if not environ.get(name)}
