"""Where rate limits are counted: this process's memory or Redis (one script, ``admit.lua``, for
every admission waiting), by the same algorithm. Each takes lists of ``Limit`` and answers,
per list, None (all counted) or (the index of the limit without room, seconds until it has room).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage

from gateway.security.types import LimitPolicy

__all__ = ["ADMIT", "Limit", "MemoryCounts", "RedisCounts", "window_s"]

ADMIT = resources.files("gateway.security").joinpath("admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest().encode()
GIVEBACK = "if redis.call('exists', KEYS[1]) == 1 then return redis.call('decr', KEYS[1]) end return 0"
_KINDS = {"sliding-window": "s", "moving-window": "m", "fixed-window": "f"}


def window_s(item: RateLimitItem) -> int:
    return int(item.get_expiry())


@dataclass(slots=True)  # not frozen: a frozen dataclass takes 3-4 times as long to build, per request
class Limit:
    """One limit of one charge."""

    policy: LimitPolicy
    item: RateLimitItem
    key: str
    cost: int




class MemoryCounts:
    """This process's own counts, with the script's algorithm (``admit.lua``, which counts as
    ``limits``' strategies do: a fixed window from its first hit, the sliding-window counter's two
    clock-aligned windows, the moving window's timestamps) over dictionaries: an admission is a few
    lookups and no awaits (``limits``' async memory storage took ~48 µs for a request's six limits,
    this ~7; bench/RESULTS.md). Memory and Redis therefore count alike, and a local fallback
    refuses where Redis would. The rare counters (account lockout, one-time codes) stay in
    ``limits``' memory storage. Expired entries are dropped every ``SWEEP_S``."""

    SWEEP_S = 5.0

    def __init__(self, strategy: str) -> None:
        self.storage = MemoryStorage()
        self.kind = _KINDS[strategy]
        self.fixed: dict[tuple[str, int, int, str], list[float]] = {}  # [count, expires at]
        self.sliding: dict[tuple[str, int, int, str], list[float]] = {}  # [window index, count, previous count]
        self.moving: dict[tuple[str, int, int, str], list[float]] = {}  # hit times, newest first
        self._windows: dict[tuple[str, int], tuple[str, int, int]] = {}
        self._swept = time.monotonic()

    def _limit(self, u: Limit) -> tuple[str, int, int]:
        found = self._windows.get((u.policy.name, id(u.item)))
        if found is None:
            found = ("f" if u.policy.budget else self.kind, u.item.amount, window_s(u.item))
            self._windows[(u.policy.name, id(u.item))] = found
        return found

    def admit_now(self, units: Sequence[Limit]) -> tuple[int, float] | None:
        """Count each limit in order up to the first without room: None, or (its index, seconds
        until it has room)."""
        now = time.time()
        if time.monotonic() - self._swept >= self.SWEEP_S:
            self._sweep(now)
        for i, u in enumerate(units):
            kind, quota, window = self._limit(u)
            key, need = (u.policy.name, quota, window, u.key), max(u.cost, 1)
            if need > quota:
                return i, float(window)
            if kind == "f":
                wait = self._fixed(key, quota, window, need, u.cost, now)
            elif kind == "s":
                wait = self._sliding(key, quota, window, need, u.cost, now)
            else:
                wait = self._moving(key, quota, window, need, u.cost, now)
            if wait is not None:
                return i, wait
        return None

    def _fixed(self, key: tuple[str, int, int, str], quota: int, window: int, need: int, cost: int,
               now: float) -> float | None:
        entry = self.fixed.get(key)
        if entry is not None and entry[1] <= now:
            entry = None
        count = entry[0] if entry is not None else 0
        if count + need > quota:
            assert entry is not None
            return max(entry[1] - now, 0.0)
        if cost:
            if entry is None:
                self.fixed[key] = [cost, now + window]
            else:
                entry[0] += cost
        return None

    def _sliding(self, key: tuple[str, int, int, str], quota: int, window: int, need: int, cost: int,
                 now: float) -> float | None:
        index = math.floor(now / window)
        entry = self.sliding.get(key)
        w, c, p = entry if entry is not None else (None, 0.0, 0.0)
        if w != index:
            p, c = (c if w == index - 1 else 0.0), 0.0
        elapsed = now - index * window
        if math.floor(p * (window - elapsed) / window) + c + need <= quota:
            if cost:
                self.sliding[key] = [index, c + cost, p]
            return None
        if c + need > quota:  # until this window is the previous one and weighs little enough
            return window - elapsed + window * (1 - (quota - need) / c)
        return max(window * (1 - (quota - c - need) / p) - elapsed, 0.0)

    def _moving(self, key: tuple[str, int, int, str], quota: int, window: int, need: int, cost: int,
                now: float) -> float | None:
        hits = self.moving.get(key)
        if hits is not None and len(hits) > quota - need and hits[quota - need] >= now - window:
            return hits[quota - need] + window - now
        if cost:
            if hits is None:
                hits = self.moving[key] = []
            hits[:0] = [now] * cost
            del hits[quota:]
        return None

    def _sweep(self, now: float) -> None:
        """Drop what can no longer refuse anything: bounded memory whatever the keys."""
        self._swept = time.monotonic()
        self.fixed = {k: v for k, v in self.fixed.items() if v[1] > now}
        self.sliding = {k: v for k, v in self.sliding.items() if v[0] >= math.floor(now / k[2]) - 1}
        self.moving = {k: v for k, v in self.moving.items() if v and v[0] >= now - k[2]}

    async def get(self, key: str) -> int:
        return await self.storage.get(key)

    async def incr(self, key: str, expiry: int) -> int:
        return await self.storage.incr(key, expiry)

    async def clear(self, key: str) -> None:
        await self.storage.clear(key)

    async def giveback(self, key: str) -> None:
        """One count less, where the count still exists (never a new entry, never below 0)."""
        if await self.storage.get(key) > 0:
            await self.storage.decr(key)

    async def ttl(self, key: str) -> float:
        return await self.storage.get_expiry(key) - time.time()

    async def close(self) -> None:
        pass


def _command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings."""
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


def _refusal(answer: Any, units: int) -> tuple[int, float] | None:
    """One admission's answer from the script: 0 (admitted) or the 1-based index of the limit that
    refused it and the wait in milliseconds; ``ValueError`` for anything else."""
    if answer == 0:
        return None
    if not isinstance(answer, list) or len(answer) != 2:
        raise ValueError(f"the admission script answered {str(answer)[:100]} for one admission")
    index, wait_ms = int(answer[0]) - 1, int(answer[1])
    if not 0 <= index < units:
        raise ValueError(f"the admission script named limit {index + 1} of {units}")
    return index, wait_ms / 1000


class RedisCounts:
    """Counts in Redis, shared by every replica: one script call admits every request waiting."""

    PREFIX = "gateway:limits:"

    def __init__(self, url: str, strategy: str, timeout_s: float) -> None:
        import redis.asyncio
        from redis.exceptions import NoScriptError

        self.client = redis.asyncio.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.kind = _KINDS[strategy].encode()
        self._no_script = NoScriptError
        self._args: dict[tuple[str, int], tuple[str, bytes, bytes, bytes]] = {}

    def _limit(self, u: Limit) -> tuple[str, bytes, bytes, bytes]:
        """A limit's key prefix and the script's values for it, worked out once."""
        found = self._args.get((u.policy.name, id(u.item)))
        if found is None:
            item, window = u.item, window_s(u.item)
            kind = b"f" if u.policy.budget else self.kind  # in the key: each kind keeps its own type of value
            found = (f"{self.PREFIX}{kind.decode()}:{u.policy.name}/{item.amount}/{window}/", kind,
                     b"%d" % item.amount, b"%d" % window)
            self._args[(u.policy.name, id(u.item))] = found
        return found

    async def admit_many(self, admissions: Sequence[Sequence[Limit]]) -> list[tuple[int, float] | None]:
        keys: list[bytes] = []
        args: list[bytes] = [",".join(str(len(units)) for units in admissions).encode()]
        for units in admissions:
            for u in units:
                prefix, kind, quota, window = self._limit(u)
                keys.append((prefix + u.key).encode())
                args += (kind, quota, window, b"%d" % u.cost)
        command = _command(b"EVALSHA", ADMIT_SHA, b"%d" % len(keys), *keys, *args)
        try:
            answers = await self._call(command)
        except self._no_script:
            await self.client.script_load(ADMIT)
            answers = await self._call(command)
        if not isinstance(answers, list) or len(answers) != len(admissions):  # never one request left unanswered
            raise ValueError(f"the admission script answered {str(answers)[:100]} to {len(admissions)} admissions")
        return [_refusal(answer, len(units)) for answer, units in zip(answers, admissions)]

    async def _call(self, command: bytes) -> Any:
        """Send one packed command on a pooled connection and read its answer (the client's own
        command path costs twice the CPU; bench/bench_limits.py)."""
        pool = self.client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()
        except BaseException:  # a timeout or a cancellation leaves an answer unread on it
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def get(self, key: str) -> int:
        return int(await self.client.get(self.PREFIX + key) or 0)

    async def incr(self, key: str, expiry: int) -> int:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(self.PREFIX + key)
            pipe.expire(self.PREFIX + key, expiry, nx=True)
            count, _ = await pipe.execute()
        return int(count)

    async def clear(self, key: str) -> None:
        await self.client.delete(self.PREFIX + key)

    async def giveback(self, key: str) -> None:
        """One count less, where the count still exists: a key that expired meanwhile is not made
        again, with no expiry, at -1."""
        await self.client.eval(GIVEBACK, 1, self.PREFIX + key)

    async def ttl(self, key: str) -> float:
        return max(0, int(await self.client.pttl(self.PREFIX + key))) / 1000

    async def close(self) -> None:
        await self.client.aclose()
