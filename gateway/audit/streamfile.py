"""The file an audit stream is appended to: checked before each write (still the file in the
stream's directory, the directory still writable), continued in a new file when it vanished,
rotated by size or age, and never left with half a record after a failed write."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["ACCESS_CHECK_S", "StreamFile"]

ACCESS_CHECK_S = 1.0
"""How often the directory is checked to be still writable (a path check runs per write)."""


class StreamFile:
    """One stream's open file, ``<stream>-<first seq>.jsonl`` in ``directory``."""

    def __init__(self, directory: Path, stream: str) -> None:
        self.directory = directory
        self.stream = stream
        self.path: Path | None = None
        self.fd = -1
        self.size = 0
        self.inode = 0
        self.opened_at = 0.0
        self._access_checked_at = -ACCESS_CHECK_S

    def named(self, first_seq: int) -> Path:
        """The file whose first record is ``first_seq``."""
        return self.directory / f"{self.stream}-{first_seq:012d}.jsonl"

    def open(self, path: Path) -> None:
        """Append to ``path`` from now on (the file open so far is fsynced and closed)."""
        self.close()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self.fd)
        self.path, self.size, self.inode, self.opened_at = path, st.st_size, st.st_ino, time.monotonic()

    def rotate(self, first_seq: int) -> None:
        """Continue in a new file, and make its name durable in the directory."""
        self.open(self.named(first_seq))
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.directory, os.O_RDONLY)
            os.fsync(dir_fd)
            os.close(dir_fd)

    def rotation_due(self, max_bytes: int, max_age_s: float) -> bool:
        return self.size >= max_bytes or (time.monotonic() - self.opened_at >= max_age_s and self.size > 0)

    def check(self, next_seq: int) -> None:
        """The open file must still be the one in the directory, and the directory writable; a
        vanished file is continued in a new one from ``next_seq`` (the chain state is in memory),
        and this write fails."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.open(self.named(next_seq))
            raise OSError(exc.errno, f"the audit file {self.path} is gone") from None
        if st.st_ino != self.inode:
            raise OSError(0, f"the audit file {self.path} was replaced")
        now = time.monotonic()
        if now - self._access_checked_at >= ACCESS_CHECK_S:  # writes to the open file still land meanwhile
            if not os.access(self.directory, os.W_OK):
                raise PermissionError(13, f"the audit directory {self.directory} is not writable")
            self._access_checked_at = now

    def write(self, data: bytes, sync: bool = True) -> None:
        """All of ``data`` (fsynced when ``sync``), or nothing of it."""
        if not data:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            if sync:
                os.fsync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)  # no half record left behind
            raise
        self.size += len(data)

    def close(self) -> None:
        """fsync (what ``process`` durability wrote and has not synced yet) and close."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
