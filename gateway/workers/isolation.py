"""Process isolation for a worker, applied by the worker itself before it loads a model.

* resource limits (no core dumps, bounded open files, optional address-space cap);
* death with the gateway (the kernel's parent-death signal), so no worker is ever orphaned;
* when started as root: a new, empty network namespace (no egress; the Unix socket still works,
  since it lives in the filesystem) and a drop to the unprivileged user and group the supervisor
  chose (a user of its own per worker), with no supplementary groups.

Each step reports what it achieved, so the worker's health can say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal

__all__ = ["apply_isolation", "die_with_parent"]

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1


def _limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unshare_network() -> bool:
    return bool(_libc().unshare(CLONE_NEWNET) == 0)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this worker when the gateway dies, however it dies (kill -9
    included), so no worker outlives it. Set after the privilege drop, which clears it."""
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the gateway died before the request took effect
        os._exit(1)


def apply_isolation(
    uid: int | None, gid: int | None, memory_limit_mb: int, parent_pid: int, max_files: int = 4096
) -> dict[str, object]:
    report: dict[str, object] = {}
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, max_files)
    if memory_limit_mb > 0:
        _limit(resource.RLIMIT_AS, memory_limit_mb * 1024 * 1024)
    report["memory_limit_mb"] = memory_limit_mb
    report["network_isolated"] = False
    if os.geteuid() == 0:
        report["network_isolated"] = _unshare_network()
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
    die_with_parent(parent_pid)
    report["uid"] = os.getuid()
    return report
