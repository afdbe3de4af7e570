"""Where rate limits are counted: this process's memory (``limits``' strategies) or Redis (one
script, ``admit.lua``, for every admission waiting). Each takes lists of ``Limit`` and answers,
per list, None (all counted) or (the index of the limit without room, seconds until it has room).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, RateLimiter

from gateway.security.types import LimitPolicy

__all__ = ["ADMIT", "Limit", "MemoryCounts", "RedisCounts", "window_s"]

ADMIT = resources.files("gateway.security").joinpath("admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest().encode()
_KINDS = {"sliding-window": "s", "moving-window": "m", "fixed-window": "f"}


def window_s(item: RateLimitItem) -> int:
    return int(item.get_expiry())


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one charge."""

    policy: LimitPolicy
    item: RateLimitItem
    key: str
    cost: int




class MemoryCounts:
    """This process's own counts, with ``limits``' strategies over its memory storage."""

    def __init__(self, strategy: type[RateLimiter]) -> None:
        self.storage = MemoryStorage()
        self.rates = strategy(self.storage)
        self.budgets = FixedWindowRateLimiter(self.storage)

    async def admit(self, units: Sequence[Limit]) -> tuple[int, float] | None:
        for i, u in enumerate(units):
            limiter = self.budgets if u.policy.budget else self.rates
            if u.cost == 0 or isinstance(limiter, FixedWindowRateLimiter):  # its hit counts even a refusal
                ok = await limiter.test(u.item, u.policy.name, u.key, cost=max(u.cost, 1))
                if ok and u.cost > 0:
                    ok = await limiter.hit(u.item, u.policy.name, u.key, cost=u.cost)
            else:
                ok = await limiter.hit(u.item, u.policy.name, u.key, cost=u.cost)
            if not ok:
                stats = await limiter.get_window_stats(u.item, u.policy.name, u.key)
                return i, stats.reset_time - time.time()
        return None

    async def get(self, key: str) -> int:
        return await self.storage.get(key)

    async def incr(self, key: str, expiry: int) -> int:
        return await self.storage.incr(key, expiry)

    async def clear(self, key: str) -> None:
        await self.storage.clear(key)

    async def ttl(self, key: str) -> float:
        return await self.storage.get_expiry(key) - time.time()

    async def close(self) -> None:
        pass


def _command(*parts: bytes) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings."""
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


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
        return [None if a == 0 else (int(a[0]) - 1, int(a[1]) / 1000) for a in answers]

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

    async def admit(self, units: Sequence[Limit]) -> tuple[int, float] | None:
        return (await self.admit_many([units]))[0]

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

    async def ttl(self, key: str) -> float:
        return max(0, int(await self.client.pttl(self.PREFIX + key))) / 1000

    async def close(self) -> None:
        await self.client.aclose()
