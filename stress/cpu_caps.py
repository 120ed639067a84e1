"""Small database hosts on one machine: each PostgreSQL server in a CPU-capped cgroup (``--cap-db-cpu``).

On one 2-core machine every process shares the same CPUs, so spreading reads over three
servers adds no capacity (issue 15).  Capping each server at a few percent of a core (cgroup
v1 ``cpu`` controller, ``cpu.cfs_quota_us``) makes each one a small host of its own: then
"direct to one copy" is bounded by one capped server and the load balancer by three.

Every group is made under ``/sys/fs/cgroup/cpu/django_lb_shm_stress_<driver pid>/`` and undone
by ``release()`` (the driver calls it in ``finally``, also on SIGTERM): the servers' processes
go back to the root group and the directories are removed.  Groups left by a driver that was
killed (its pid is gone) are removed at the next start.
"""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Iterable, Optional

from django_lb_shm.shm.state import pid_alive

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PREFIX = "django_lb_shm_stress_"
MIN_QUOTA_US = 1_000   # the kernel's smallest quota


def unavailable_reason(root: Path = CPU_ROOT) -> Optional[str]:
    """Why the caps cannot be used here; None when they can."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {root} (cpu.cfs_quota_us missing)"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root)"
    return None


class CpuCaps:
    def __init__(self, percent: float, root: Path = CPU_ROOT):
        if not 0 < percent <= 100:
            raise ValueError(f"--cap-db-cpu wants a percentage of one core in (0, 100], got {percent}")
        self.percent = percent
        self.root = root
        self.base = root / f"{PREFIX}{os.getpid()}"
        self.groups: list[Path] = []

    def cap(self, name: str, pids: Iterable[int]) -> Path:
        """Put ``pids`` (and so every process they fork later) in a group of their own capped at
        ``percent`` % of one core."""
        remove_stale_groups(self.root)
        self.base.mkdir(exist_ok=True)
        group = self.base / name
        group.mkdir(exist_ok=True)
        self.groups.append(group)
        period, quota = period_and_quota(self.percent)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        for pid in pids:
            _move(pid, group)
        return group

    def release(self) -> None:
        """Every process back in the root group, every directory removed; safe to call twice."""
        for group in reversed(self.groups):
            _empty_and_remove(group, self.root)
        self.groups.clear()
        _remove_dir(self.base)


def period_and_quota(percent: float) -> tuple[int, int]:
    """The shortest period (at least 10 ms) whose quota is at least the kernel's 1 ms: short periods
    make a slow host rather than one that stops for most of a long period."""
    period = max(10_000, math.ceil(MIN_QUOTA_US * 100 / percent))
    return period, max(MIN_QUOTA_US, round(period * percent / 100))


def remove_stale_groups(root: Path = CPU_ROOT) -> None:
    """Groups of drivers that are gone (killed before their ``release()``)."""
    for base in root.glob(f"{PREFIX}*"):
        try:
            owner = int(base.name[len(PREFIX):])
        except ValueError:
            continue
        if owner == os.getpid() or pid_alive(owner):
            continue
        for group in base.iterdir():
            if group.is_dir():
                _empty_and_remove(group, root)
        _remove_dir(base)


def _move(pid: int, group: Path) -> None:
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        if exc.errno != errno.ESRCH:   # a backend that ended meanwhile
            raise


def _empty_and_remove(group: Path, root: Path) -> None:
    try:
        pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        pids = []
    for pid in pids:
        _move(pid, root)
    _remove_dir(group)


def _remove_dir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass

