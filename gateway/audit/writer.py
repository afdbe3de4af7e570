"""The audit writer: one hash-chained stream per serving process.

``append`` returns once the record is as durable as ``audit.durability`` asks, and the answer it
records leaves only after that, so a response that reached its client always has its record:

* ``process`` (the default): the record is written to the file from the event loop (a write to
  the kernel's page cache, microseconds). Under load answers complete in bursts, and a write
  costs as much as sealing a few records: after a turn of the loop that appended more than once,
  the next turn's records are all written together at its end (one write and one path check);
  after a quiet turn, its first record is written at once (one client waits for nothing) and
  only the others wait for the end. It survives ``kill -9`` of any process, and an fsync follows
  within ``audit.fsync_interval_ms``. A power cut may lose that interval, as with Linux auditd's
  default ``flush = INCREMENTAL_ASYNC``.
* ``fsync``: records are group-committed: written and fsynced together with whatever arrived while
  the previous batch was being synced (and within ``audit.flush_window_ms``), in a thread.

Checkpoints (signed) are added every ``checkpoint_every`` records or ``checkpoint_interval_s``, at
rotation, at start-up and at shutdown; files rotate by size or age and the chain continues across
them.

Every writer also keeps the log's signed stream manifest (``streams.json``, see
``gateway.audit.chain``) true: its stream is ``open`` from start-up, and ``sealed`` at the last
record's number once the shutdown checkpoint is written, so a verifier knows which streams must
exist and where each closed one ends.

On start-up the stream's last file is read back: a torn last line (a crash mid-write, before any
response depended on it) is cut off and described in a ``recovery`` record, and the chain
continues from the last complete record. A write that fails (disk full, the directory gone or
unwritable) fails the requests waiting on it with ``AuditUnavailable`` (503); the writer tries
again a second later and carries on when it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread

from gateway import __version__
from gateway.audit.chain import FILE_PATTERN, GENESIS, AuditKey, canonical, digest, update_manifest
from gateway.audit.streamfile import StreamFile
from gateway.config import AuditConfig
from gateway.errors import Unavailable

__all__ = ["AuditUnavailable", "AuditWriter", "utc_now"]

log = logging.getLogger("gateway.audit")
RETRY_S = 1.0


class AuditUnavailable(Unavailable):
    type = "audit-unavailable"
    title = "Audit log unavailable"


_second: list[object] = [-1, ""]  # the last whole second formatted, and its text


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the microsecond (``2026-12-02T13:45:03.123456Z``); the date and
    time are formatted once per second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


@dataclass
class _Pending:
    record: dict[str, Any]
    future: asyncio.Future[None] | None = None


@dataclass
class _State:
    seq: int = 0
    prev: str = GENESIS
    since_checkpoint: int = 0
    last_kind: str = ""
    notes: list[str] = field(default_factory=list)

    def draft(self) -> _State:
        """A copy to seal a batch against, which becomes the state once the batch is written."""
        return _State(self.seq, self.prev, self.since_checkpoint, self.last_kind)


class AuditWriter:
    def __init__(self, config: AuditConfig, stream: str, key: AuditKey) -> None:
        self.config = config
        self.stream = stream
        self.key = key
        self.directory = Path(config.directory) / stream
        self.state = _State()
        self.file = StreamFile(self.directory, stream)
        self.last_checkpoint_at = time.monotonic()
        self.failed: str | None = None
        self.retry_at = 0.0
        self._lock_fd = -1
        self._pending: list[_Pending] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._sync_handle: asyncio.TimerHandle | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._turn: list[tuple[tuple[dict[str, Any], ...], asyncio.Future[None]]] | None = None
        """``process`` durability: None, or the records waiting for the end of this loop turn."""
        self._turn_appends = 0
        self._busy = False
        """The last turn of the loop appended more than once: this one's records all wait for its end."""
        self._write_lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self.count: Callable[[int], object] | None = None
        """Told how many records each write added (the ``gateway_audit_records`` counter)."""

    # -- start-up ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Take the stream (one process per stream), recover its state, and open the newest file."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"audit stream {self.directory} is in use by another gateway process") from None
        files = sorted(f for f in self.directory.iterdir() if FILE_PATTERN.match(f.name))
        torn = b""
        for path in reversed(files):
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data) and path == files[-1]:
                torn = data[cut:]
                with open(path, "r+b") as f:  # the torn tail never got an answer out: cut it off
                    f.truncate(cut)
            lines = data[:cut].splitlines()
            if lines:
                last = orjson_loads(lines[-1])
                self.state = _State(seq=int(last["seq"]), prev=digest(lines[-1]), last_kind=str(last.get("kind")))
                break
        self.file.open(files[-1] if files else self.file.named(self.state.seq + 1))
        start: list[dict[str, Any]] = [{"kind": "start", "pid": os.getpid(), "version": __version__}]
        if torn:
            start.append({"kind": "recovery", "torn_bytes": len(torn), "torn_sha256": hashlib.sha256(torn).hexdigest(),
                          "detail": "a record torn by a crash was cut off; the chain continues from the last whole one"})
            log.warning("audit stream %s: cut off a torn last record (%d bytes) left by a crash", self.stream, len(torn))
        if self.state.seq and self.state.last_kind != "checkpoint":
            start.append({"kind": "note", "detail": f"records after the last checkpoint, up to {self.state.seq}, "
                          "were found unsealed (the gateway stopped without closing the log)"})
        lines = [self._seal(r) for r in start]
        lines.append(self._seal(self._checkpoint("start")))
        self.file.write(b"".join(lines))
        self._commit(lines, self.state)
        update_manifest(Path(self.config.directory), self.stream, None, self.key)

    async def start_ticker(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.config.checkpoint_interval_s))
            if self.state.since_checkpoint and time.monotonic() - self.last_checkpoint_at >= self.config.checkpoint_interval_s:
                with contextlib.suppress(AuditUnavailable):
                    await self.append(self._checkpoint("interval"))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sync_handle is not None:
            self._sync_handle.cancel()
        try:
            await self.append(self._checkpoint("shutdown"))
            self._seal_manifest()
        except AuditUnavailable:
            pass  # the stream stays "open" in the manifest: a verifier reports it unsealed
        self.file.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)

    def append_now(self, record: dict[str, Any]) -> None:
        """Write one record at once, without an event loop (the supervisor's model events)."""
        state = self.state.draft()
        lines = [self._seal(record, state)]
        if record.get("kind") != "checkpoint":
            lines.append(self._seal(self._checkpoint("event"), state))  # rare events: seal each at once
        self.file.check(self.state.seq + 1)
        self.file.write(b"".join(lines))
        self.state = state
        self._commit(lines, state)

    def close_now(self) -> None:
        """``close`` without an event loop."""
        with contextlib.suppress(OSError):
            self.append_now(self._checkpoint("shutdown"))
            self._seal_manifest()
        self.file.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        self._lock_fd = -1

    def _seal_manifest(self) -> None:
        try:
            update_manifest(Path(self.config.directory), self.stream, self.state.seq, self.key)
        except OSError as exc:
            log.error("audit stream %s: cannot record its seal in the stream manifest: %s", self.stream, exc)

    # -- appending ----------------------------------------------------------------------------------
    def _checkpoint(self, reason: str) -> dict[str, Any]:
        return {"kind": "checkpoint", "reason": reason}

    def _seal(self, record: dict[str, Any], state: _State | None = None) -> bytes:
        """Number, link and (for checkpoints) sign one record against ``state``, advancing it."""
        s = state or self.state
        full = {**record, "seq": s.seq + 1, "prev": s.prev, "stream": self.stream}
        full.setdefault("time", utc_now())
        if full["kind"] == "checkpoint":
            full = self.key.sign(full)
        line = canonical(full)
        s.seq, s.prev, s.last_kind = s.seq + 1, digest(line), str(full["kind"])
        s.since_checkpoint = 0 if full["kind"] == "checkpoint" else s.since_checkpoint + 1
        return line + b"\n"

    def _commit(self, lines: list[bytes], state: _State) -> None:
        """Account for ``lines``, written after sealing them against ``state``."""
        if state.since_checkpoint < len(lines):  # a checkpoint among them (its seal resets the count)
            self.last_checkpoint_at = time.monotonic()
        if self.count is not None:
            self.count(len(lines))

    async def append(self, *records: dict[str, Any]) -> None:
        """Append records, in order; return once they are as durable as ``audit.durability`` asks.
        Raises ``AuditUnavailable`` when they cannot be written."""
        if self.failed is not None and time.monotonic() < self.retry_at:
            raise AuditUnavailable(f"the audit log cannot be written ({self.failed}); nothing is served unrecorded",
                                   retry_after=int(RETRY_S) + 1)
        loop = asyncio.get_running_loop()
        if (self.config.durability == "process" and not self._pending and not self._write_lock.locked()
                and not self._rotation_due()):
            if self._turn is None:  # the first records of this turn of the event loop
                self._turn, self._turn_appends = [], 0
                loop.call_soon(self._write_turn)
                if not self._busy:  # the last turn had one: likely alone again, written at once
                    self._turn_appends = 1
                    self._write_now(records)
                    return
            self._turn_appends += 1
            turn: asyncio.Future[None] = loop.create_future()  # the others: together, at the turn's end
            self._turn.append((records, turn))
            await turn
            return
        future: asyncio.Future[None] = loop.create_future()
        self._pending.extend(_Pending(r) for r in records[:-1])
        self._pending.append(_Pending(records[-1], future))
        if len(self._pending) >= 256:
            self._schedule(0.0)
        elif self._flush_handle is None:
            self._schedule(self.config.flush_window_ms / 1000)
        await future

    def _write_now(self, records: tuple[dict[str, Any], ...]) -> None:
        """``process`` durability: seal and write, in the event loop (a write to the page cache);
        the fsync follows in a thread within ``fsync_interval_ms``."""
        state = self.state.draft()
        lines = [self._seal(r, state) for r in records]
        if state.since_checkpoint >= self.config.checkpoint_every:
            lines.append(self._seal(self._checkpoint("count"), state))
        try:
            self.file.check(self.state.seq + 1)
            self.file.write(b"".join(lines), sync=False)
        except OSError as exc:
            raise self._failure(exc) from None
        self._recovered()
        self.state = state
        self._commit(lines, state)
        if self._sync_handle is None:
            self._sync_handle = asyncio.get_running_loop().call_later(self.config.fsync_interval_ms / 1000,
                                                                      self._start_sync)

    def _write_turn(self) -> None:
        """The records of one turn of the event loop not written at once: one write and one path
        check for all of them, then their answers may leave."""
        batch, self._turn = self._turn or [], None
        self._busy = self._turn_appends > 1
        if not batch:
            return
        try:
            self._write_now(tuple(r for records, _ in batch for r in records))
        except AuditUnavailable as exc:
            for _, waiting in batch:
                if not waiting.done():
                    waiting.set_exception(exc)
            return
        for _, waiting in batch:
            if not waiting.done():
                waiting.set_result(None)

    def _start_sync(self) -> None:
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_later())  # kept: a task needs a holder

    async def _sync_later(self) -> None:
        """The fsync that follows ``process``-durable writes (on a duplicate of the file's
        descriptor: a rotation may close the original meanwhile, after its own fsync)."""
        self._sync_handle = None
        try:
            fd = os.dup(self.file.fd)
        except OSError:
            return
        try:
            await anyio.to_thread.run_sync(os.fsync, fd)
        except OSError as exc:
            log.error("audit log %s cannot be fsynced: %s", self.file.path, exc)
        finally:
            os.close(fd)

    def _failure(self, exc: OSError) -> AuditUnavailable:
        """Note a failed write (retried after ``RETRY_S``) and the error its requests get."""
        self.failed = f"{type(exc).__name__}: {exc.strerror or exc}"
        self.retry_at = time.monotonic() + RETRY_S
        log.error("audit log %s cannot be written: %s", self.file.path, self.failed)
        return AuditUnavailable(f"the audit log cannot be written ({self.failed}); nothing is served unrecorded",
                                retry_after=int(RETRY_S) + 1)

    def _recovered(self) -> None:
        if self.failed is not None:
            log.warning("audit log %s is writable again", self.file.path)
            self.failed = None

    def _schedule(self, delay: float) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        loop = asyncio.get_running_loop()
        self._flush_handle = loop.call_later(delay, lambda: loop.create_task(self._flush()))

    async def _flush(self) -> None:
        async with self._write_lock:
            self._flush_handle = None
            self._write_turn()  # records of this turn that came first go first
            batch, self._pending = self._pending, []
            if not batch:
                return
            state = self.state.draft()
            lines: list[bytes] = []
            rotate = self._rotation_due()
            if rotate:
                lines.append(self._seal(self._checkpoint("rotation"), state))
            head, body = lines, []
            for p in batch:
                body.append(self._seal(p.record, state))
            if state.since_checkpoint >= self.config.checkpoint_every:
                body.append(self._seal(self._checkpoint("count"), state))
            try:
                await anyio.to_thread.run_sync(self._write_batch, b"".join(head), b"".join(body), state.seq, rotate)
            except OSError as exc:
                error = self._failure(exc)
                for p in batch:
                    if p.future is not None and not p.future.done():
                        p.future.set_exception(error)
                return
            self._recovered()
            self.state = state
            self._commit(head + body, state)
            for p in batch:
                if p.future is not None and not p.future.done():
                    p.future.set_result(None)

    def _rotation_due(self) -> bool:
        return self.file.rotation_due(self.config.max_file_bytes, self.config.rotate_interval_s)

    def _write_batch(self, head: bytes, body: bytes, last_seq: int, rotate: bool) -> None:
        """In a thread: check the target, write, fsync; on failure leave the file as it was."""
        self.file.check(self.state.seq + 1)
        self.file.write(head)
        if rotate:
            self.file.rotate(last_seq - body.count(b"\n") + 1)
        self.file.write(body)


def orjson_loads(line: bytes) -> dict[str, Any]:
    import orjson

    value = orjson.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a record")
    return value
