"""Rate limits, query budgets and failed-authentication throttling, on the ``limits`` library.

``limits``' async API (the engine inside slowapi, without slowapi's middleware; DESIGN.md says
why) with memory storage by default, or Redis so that every replica enforces one limit together.

Redis is never a single point of failure: a call that errs or takes longer than
``storage_timeout_s`` switches this process to local, in-memory counting (the same limits, per
process), logs it once, reports it in ``/v2/health/ready``, and tries Redis again every
``storage_retry_s``; the first call that succeeds switches back. No request gets a 500 for it.

Policies, each a list of limits (``"10/second;500/hour"``):

===========================  ==============================  =========================================
policy                       key                             where
===========================  ==============================  =========================================
``per-address``              client address                  before authentication (not on probes)
``failed-auth``              client address                  refused credentials (401, token endpoint)
``per-address-probes``       client address                  health probes (this process's memory only)
``per-principal``            issuer + subject                after authentication
``global``                   one key                         after authentication
``per-principal-model``      principal + model               inference
``budget-inferences``        principal + model               inference, cost 1 (fixed window)
``budget-rows``              principal + model               inference, cost = input rows
===========================  ==============================  =========================================

Account lockout (the built-in issuer's consecutive failed sign-ins) uses the same storage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from gateway.config import LimitsConfig
from gateway.errors import TooManyRequests

__all__ = ["BudgetExhausted", "LimitPolicy", "Limiter", "RateLimited"]

log = logging.getLogger("gateway.limits")
T = TypeVar("T")

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    name: str
    items: tuple[RateLimitItem, ...]
    budget: bool = False
    """Budgets count in fixed windows (a day is a day), whatever the rate-limit strategy."""

    @classmethod
    def parse(cls, name: str, text: str, budget: bool = False) -> LimitPolicy | None:
        return cls(name, tuple(parse_many(text)), budget) if text else None


def _window_s(item: RateLimitItem) -> int:
    return int(item.get_expiry())


class RateLimited(TooManyRequests):
    type = "rate-limited"
    title = "Rate limit exceeded"

    def __init__(self, policy: LimitPolicy, item: RateLimitItem, retry_after: int, detail: str | None = None) -> None:
        super().__init__(detail or f"{policy.name}: more than {item} (try again in {retry_after} s)",
                         retry_after=retry_after, policy=policy.name, limit=str(item))
        # draft-ietf-httpapi-ratelimit-headers: the policy's quota and window, and what remains.
        self.headers["RateLimit-Policy"] = f'"{policy.name}";q={item.amount};w={_window_s(item)}'
        self.headers["RateLimit"] = f'"{policy.name}";r=0;t={retry_after}'


class BudgetExhausted(RateLimited):
    type = "budget-exhausted"
    title = "Query budget exhausted"

    def __init__(self, policy: LimitPolicy, item: RateLimitItem, retry_after: int) -> None:
        reset = datetime.fromtimestamp(time.time() + retry_after, UTC).isoformat(timespec="seconds")
        super().__init__(policy, item, retry_after,
                         f"{policy.name}: the budget of {item} for this model is used up; it resets at {reset}")
        self.extensions["reset"] = reset


class Limiter:
    """Every policy of ``[limits]`` over one storage, with the local fallback described above."""

    def __init__(self, config: LimitsConfig, max_failed_logins: int = 100, lockout_s: float = 900) -> None:
        self.config = config
        self.local: Storage = MemoryStorage()
        self.shared: Storage | None = None
        if config.storage.startswith(("redis://", "rediss://")):
            timeout = config.storage_timeout_s
            self.shared = RedisStorage(
                "async+" + config.storage, implementation="redispy", wrap_exceptions=True,
                socket_timeout=timeout, socket_connect_timeout=timeout,
            )
        self.degraded: str | None = None
        self.retry_at = 0.0
        self.max_failed_logins = max_failed_logins
        self.lockout_s = lockout_s
        strategy = _STRATEGIES[config.strategy]
        self._limiters: dict[tuple[int, bool], RateLimiter] = {}
        for storage in (self.local, self.shared):
            if storage is not None:
                self._limiters[(id(storage), False)] = strategy(storage)
                self._limiters[(id(storage), True)] = FixedWindowRateLimiter(storage)
        c = config
        self.per_address = LimitPolicy.parse("per-address", c.per_address)
        self.failed_auth = LimitPolicy.parse("failed-auth", c.failed_auth_per_address)
        self.per_address_probes = LimitPolicy.parse("per-address-probes", c.per_address_probes)
        self.per_principal = LimitPolicy.parse("per-principal", c.per_principal)
        self.global_ = LimitPolicy.parse("global", c.global_limit)
        self.per_principal_model = LimitPolicy.parse("per-principal-model", c.per_principal_model)
        self.budget_inferences = LimitPolicy.parse("budget-inferences", c.budget_inferences, budget=True)
        self.budget_rows = LimitPolicy.parse("budget-rows", c.budget_rows, budget=True)
        self.per_principal_explain = LimitPolicy.parse("per-principal-explain", c.per_principal_explain)

    async def _run(self, call: Callable[[Storage], Awaitable[T]]) -> T:
        """Run against Redis when it is healthy, else (and on any failure) against local memory."""
        if self.shared is not None and time.monotonic() >= self.retry_at:
            try:
                result = await asyncio.wait_for(call(self.shared), self.config.storage_timeout_s)
            except Exception as exc:  # any storage failure: never a 500, never unenforced
                reason = f"{type(exc).__name__}: {exc}"[:200]
                if self.degraded is None:
                    log.warning("rate-limit storage unreachable (%s); enforcing local limits per process", reason)
                self.degraded = reason
                self.retry_at = time.monotonic() + self.config.storage_retry_s
            else:
                if self.degraded is not None:
                    log.warning("rate-limit storage is back; shared limits apply again")
                    self.degraded = None
                return result
        return await call(self.local)

    def _limiter(self, storage: Storage, policy: LimitPolicy) -> RateLimiter:
        return self._limiters[(id(storage), policy.budget)]

    async def hit(self, policy: LimitPolicy | None, key: str, cost: int = 1, local: bool = False) -> None:
        """Count ``cost`` against every limit of ``policy`` for ``key``; 429 when one is exceeded.
        ``local`` counts in this process's memory, whatever the configured storage."""
        if policy is None:
            return
        for item in policy.items:
            def call(storage: Storage, item: RateLimitItem = item) -> Awaitable[bool]:
                return self._limiter(storage, policy).hit(item, policy.name, key, cost=cost)

            if not (await call(self.local) if local else await self._run(call)):
                raise await self._refusal(policy, item, key, local)

    async def exceeded(self, policy: LimitPolicy | None, key: str) -> None:
        """Raise 429 if ``policy`` is already used up for ``key``, without counting anything."""
        if policy is None:
            return
        for item in policy.items:
            def call(storage: Storage, item: RateLimitItem = item) -> Awaitable[bool]:
                return self._limiter(storage, policy).test(item, policy.name, key)

            if not await self._run(call):
                raise await self._refusal(policy, item, key)

    async def _refusal(self, policy: LimitPolicy, item: RateLimitItem, key: str, local: bool = False) -> RateLimited:
        def window(s: Storage) -> Awaitable[Any]:
            return self._limiter(s, policy).get_window_stats(item, policy.name, key)

        stats = await (window(self.local) if local else self._run(window))
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return BudgetExhausted(policy, item, retry_after) if policy.budget else RateLimited(policy, item, retry_after)

    # -- consecutive failed sign-ins per account (NIST SP 800-63B section 5.2.2) -------------------
    async def account_locked(self, account: str, limit: int | None = None) -> int:
        """Seconds until ``account`` may try again (``limit`` failures, by default
        ``max_failed_logins``), or 0."""
        key = f"gateway/lockout/{account}"
        count = await self._run(lambda s: s.get(key))
        if count < (limit or self.max_failed_logins):
            return 0
        expiry = await self._run(lambda s: s.get_expiry(key))
        return max(1, math.ceil(expiry - time.time()))

    async def account_failed(self, account: str, limit: int | None = None) -> None:
        key = f"gateway/lockout/{account}"
        count = await self._run(lambda s: s.incr(key, int(self.lockout_s)))
        if count == (limit or self.max_failed_logins):
            log.warning("account %r locked for up to %d s after %d consecutive failures",
                        account, self.lockout_s, count)

    async def account_succeeded(self, account: str) -> None:
        key = f"gateway/lockout/{account}"
        await self._run(lambda s: s.clear(key))

    def status(self) -> dict[str, Any]:
        storage = "redis" if self.shared is not None else "memory"
        if self.degraded is None:
            return {"storage": storage, "shared": self.shared is not None}
        return {"storage": storage, "shared": False, "degraded": f"using local limits: {self.degraded}"}

    async def close(self) -> None:
        if self.shared is not None:
            bridge: Any = getattr(self.shared, "bridge", None)
            storage: Any = getattr(bridge, "storage", None)
            if storage is not None and hasattr(storage, "aclose"):
                await storage.aclose()
