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

__all__ = ["apply_isolation", "die_with_parent", "drop_capabilities"]

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unshare_network() -> bool:
    return bool(_libc().unshare(CLONE_NEWNET) == 0)


def drop_capabilities() -> bool:
    """A gateway that is not root holds no capability: a runtime that grants the container
    CAP_SETUID and CAP_SETGID (for the image's worker helper) hands them to its non-root process
    as ambient capabilities too, enough to become root. Clear the effective, permitted,
    inheritable and ambient sets; the bounding set stays, so the set-user-ID helper still works.
    True when nothing is left."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = _libc()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)()) != 0:
        return False
    with open("/proc/self/status") as status:
        held = {k: v.strip() for k, _, v in (line.partition(":") for line in status) if k.startswith("Cap")}
    return all(int(held.get(k, "0"), 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapAmb"))


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
