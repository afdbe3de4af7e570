"""How a worker process ends, and what the supervisor makes of it."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    OK = 0
    BAD_ARGUMENTS = 2
    DEVICE = 3
    """The configured device (``cuda``) is not available."""
    MODEL = 4
    """The model does not load."""
    CANNOT_DROP = 126
    """``server.worker_exec`` could not start the worker as its own user (the container lacks the
    capabilities it needs): the gateway refuses rather than run the worker as itself."""

    @classmethod
    def permanent(cls, code: int) -> bool:
        """An exit a restart will not fix."""
        return code in (cls.DEVICE, cls.MODEL, cls.CANNOT_DROP)
