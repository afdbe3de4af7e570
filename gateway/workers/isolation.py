"""Process isolation for a worker, applied by the worker itself before it loads a model.

* resource limits (no core dumps, bounded open files, optional address-space cap);
* when started as root: a new, empty network namespace (no egress; the Unix socket still works,
  since it lives in the filesystem) and a drop to an unprivileged user with no supplementary
  groups.

Each step reports what it achieved, so the worker's health can say so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import resource

__all__ = ["apply_isolation"]

CLONE_NEWNET = 0x40000000


def _limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _unshare_network() -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return bool(libc.unshare(CLONE_NEWNET) == 0)


def apply_isolation(user: str | None, memory_limit_mb: int, max_files: int = 4096) -> dict[str, object]:
    report: dict[str, object] = {}
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, max_files)
    if memory_limit_mb > 0:
        _limit(resource.RLIMIT_AS, memory_limit_mb * 1024 * 1024)
    report["memory_limit_mb"] = memory_limit_mb
    report["network_isolated"] = False
    if os.geteuid() == 0:
        report["network_isolated"] = _unshare_network()
        if user:
            entry = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
    report["uid"] = os.getuid()
    return report
