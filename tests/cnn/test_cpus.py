"""The cores a process may use and the native pools sized to them (containers see the host's cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cnn.cpus import cpu_quota, native_pool_settings, usable_cpus


def _cgroup(root: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> Path:
    """A cgroup folder as the kernel shows it to a container (v2: cpu.max; v1: cpu/cpu.cfs_quota_us and period)."""
    if v2 is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir(parents=True, exist_ok=True)
        (root / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return root


def test_the_container_s_quota_caps_the_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_quota(_cgroup(tmp_path / "v2", v2="150000 100000")) == 1.5
    assert usable_cpus(tmp_path / "v2") == min(cores, 2)  # 1.5 CPUs of time: two threads can use it
    assert cpu_quota(_cgroup(tmp_path / "v1", v1=("50000", "100000"))) == 0.5
    assert usable_cpus(tmp_path / "v1") == 1
    assert cpu_quota(_cgroup(tmp_path / "open2", v2="max 100000")) is None
    assert cpu_quota(_cgroup(tmp_path / "open1", v1=("-1", "100000"))) is None
    assert usable_cpus(tmp_path / "open2") == usable_cpus(tmp_path / "none") == cores
    assert usable_cpus(_cgroup(tmp_path / "big", v2="6400000 100000")) == cores  # a quota above the affinity


def test_pools_are_sized_once_and_the_user_s_sizes_win(tmp_path: Path) -> None:
    limited = _cgroup(tmp_path / "limited", v2="100000 100000")
    assert native_pool_settings({}, limited) == {
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    assert native_pool_settings({"OMP_NUM_THREADS": "3"}, limited) == {
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if usable_cpus(tmp_path) == os.cpu_count():  # a host to itself: torch keeps its own default (physical cores)
        assert native_pool_settings({}, tmp_path) == {"OPENBLAS_NUM_THREADS": str(os.cpu_count())}


def test_the_console_script_sizes_the_pools_before_numpy_loads() -> None:
    """OpenBLAS reads its size once, when numpy loads: the entry point must get there first."""
    probe = "import sys, flows.entry; print('numpy' in sys.modules, 'torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["False", "False"]
