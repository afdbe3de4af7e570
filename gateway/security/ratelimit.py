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

Account lockout (the built-in issuer's consecutive failed sign-ins) and the one use of each
one-time code use the same storage.

**One round trip per request.** A request's limits are *charges* (policy, key, cost) gathered on
its way in and admitted together: by address and failed-auth before authentication, by principal
and globally after it, by principal and model and both budgets once the inputs are checked. With
Redis the admission is one Lua script (``admit.lua``): it counts each limit in order, as separate
calls did, up to the first without room, and returns that limit's wait in the same reply (so a
request refused by its budget still counts against its address and principal, and one refused
per address spends no budget). The memory storage runs the same algorithm over dictionaries. Routes
without model limits are admitted right after authentication; an inference, where the model-level
limits are; a request refused on the way (a bad body, a 403) still has its charges counted.

Since the address and principal limits are then known only after authentication (and, for an
inference, after decoding), each process remembers a refusal it received until its wait is over
(``_denied``; only refusals that a smaller request could not escape): the next request of that
address or principal is refused up front, before its token is checked or its body read, without a
round trip. The failed-auth limit still refuses an address as soon as its count is reached.

The script counts as ``limits`` does for each strategy (a fixed window from its first hit, the
sliding-window counter's two windows aligned to the clock, the moving window's list of
timestamps), with both sliding windows in one hash (a few Redis calls per limit instead of seven);
``tests/security/test_limit_counts.py`` holds the memory counts to ``limits``' own strategies.
All of a request's keys go to one Redis: a single server, or a primary with replicas (Sentinel);
Redis Cluster would need every key in one slot, which it is not.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from limits import RateLimitItem

from gateway.config import LimitsConfig
from gateway.errors import TooManyRequests
from gateway.security.limitstores import Limit, MemoryCounts, RedisCounts, window_s
from gateway.security.types import Charge, LimitPolicy

__all__ = ["BudgetExhausted", "Charge", "LimitPolicy", "Limiter", "RateLimited"]

log = logging.getLogger("gateway.limits")
T = TypeVar("T")

BATCH_MAX = 64
"""Admissions sent in one script call at most."""
TRYING_TTL_S = 60
"""How long a place taken by a sign-in attempt outlives a process that died judging it."""


class RateLimited(TooManyRequests):
    type = "rate-limited"
    title = "Rate limit exceeded"

    def __init__(self, policy: LimitPolicy, item: RateLimitItem, retry_after: int, detail: str | None = None) -> None:
        super().__init__(detail or f"{policy.name}: more than {item} (try again in {retry_after} s)",
                         retry_after=retry_after, policy=policy.name, limit=str(item))
        # draft-ietf-httpapi-ratelimit-headers: the policy's quota and window, and what remains.
        self.headers["RateLimit-Policy"] = f'"{policy.name}";q={item.amount};w={window_s(item)}'
        self.headers["RateLimit"] = f'"{policy.name}";r=0;t={retry_after}'


class BudgetExhausted(RateLimited):
    type = "budget-exhausted"
    title = "Query budget exhausted"

    def __init__(self, policy: LimitPolicy, item: RateLimitItem, retry_after: int) -> None:
        reset = datetime.fromtimestamp(time.time() + retry_after, UTC).isoformat(timespec="seconds")
        super().__init__(policy, item, retry_after,
                         f"{policy.name}: the budget of {item} for this model is used up; it resets at {reset}")
        self.extensions["reset"] = reset



def _refusal(unit: Limit, wait_s: float) -> RateLimited:
    retry_after = max(1, math.ceil(wait_s))
    cls = BudgetExhausted if unit.policy.budget else RateLimited
    return cls(unit.policy, unit.item, retry_after)




_Backend = MemoryCounts | RedisCounts


def _retrieve(admission: asyncio.Future[None]) -> None:
    if not admission.cancelled():
        admission.exception()
DENIED_MAX = 65536
"""Refusals remembered per process (addresses and principals over a limit); beyond it the oldest go."""


class Limiter:
    """Every policy of ``[limits]`` over one storage, with the local fallback described above."""

    def __init__(self, config: LimitsConfig, max_failed_logins: int = 100, lockout_s: float = 900) -> None:
        self.config = config
        self.local = MemoryCounts(config.strategy)
        self.shared: RedisCounts | None = None
        if config.shared:
            self.shared = RedisCounts(config.storage, config.strategy, config.storage_timeout_s)
        self.degraded: str | None = None
        self.retry_at = 0.0
        self.max_failed_logins = max_failed_logins
        self.lockout_s = lockout_s
        self._denied: dict[tuple[str, str], float] = {}
        self._queue: list[tuple[list[Limit], asyncio.Future[tuple[int, float] | None]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
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

    def _shared_now(self) -> RedisCounts | None:
        return self.shared if self.shared is not None and time.monotonic() >= self.retry_at else None

    async def _run(self, call: Callable[[_Backend], Awaitable[T]]) -> T:
        """Run against Redis when it is healthy, else (and on any failure) against local memory."""
        shared = self._shared_now()
        if shared is not None:
            try:
                async with asyncio.timeout(self.config.storage_timeout_s):
                    result = await call(shared)
            except Exception as exc:  # any storage failure: never a 500, never unenforced
                self._failed(exc)
            else:
                self._succeeded()
                return result
        return await call(self.local)

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:200]
        if self.degraded is None:
            log.warning("rate-limit storage unreachable (%s); enforcing local limits per process", reason)
            self._denied.clear()  # what Redis refused is not what this process counts
        self.degraded = reason
        self.retry_at = time.monotonic() + self.config.storage_retry_s

    def _succeeded(self) -> None:
        if self.degraded is not None:
            log.warning("rate-limit storage is back; shared limits apply again")
            self.degraded = None
            self._denied.clear()

    async def _admit(self, units: list[Limit]) -> tuple[int, float] | None:
        """Admit ``units`` in Redis with whatever other requests ask in the same turn of the event
        loop: one script call for them all."""
        waiting: asyncio.Future[tuple[int, float] | None] = asyncio.get_running_loop().create_future()
        self._queue.append((units, waiting))
        if len(self._queue) == 1:
            flush = asyncio.get_running_loop().create_task(self._flush())
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await waiting

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            try:
                assert self.shared is not None
                async with asyncio.timeout(self.config.storage_timeout_s):
                    results = await self.shared.admit_many([units for units, _ in batch])
            except asyncio.CancelledError:  # shutting down: nobody waits forever
                for _, waiting in [*batch, *self._queue]:
                    waiting.cancel()
                self._queue = []
                raise
            except Exception as exc:  # any storage failure: never a 500, never unenforced
                self._failed(exc)
                results = [self.local.admit_now(units) for units, _ in batch]
            else:
                self._succeeded()
            for (_, waiting), result in zip(batch, results, strict=True):
                if not waiting.done():
                    waiting.set_result(result)

    def refuse_known(self, policy: LimitPolicy | None, key: str) -> None:
        """Raise the refusal this process last received for ``policy`` and ``key`` while its wait
        lasts; no round trip."""
        if policy is None or not self._denied:
            return
        until = self._denied.get((policy.name, key))
        if until is None:
            return
        wait = until - time.monotonic()
        if wait <= 0:
            del self._denied[(policy.name, key)]
            return
        raise _refusal(Limit(policy, policy.items[0], key, 1), wait)

    def _remember(self, unit: Limit, wait_s: float) -> None:
        if len(self._denied) >= DENIED_MAX:
            now = time.monotonic()
            self._denied = {k: v for k, v in self._denied.items() if v > now}
            while len(self._denied) >= DENIED_MAX:
                del self._denied[next(iter(self._denied))]
        self._denied[(unit.policy.name, unit.key)] = time.monotonic() + wait_s

    def _units(self, charges: Iterable[Charge]) -> list[Limit]:
        """Each limit of each charge; a refusal this process remembers raises here, before any I/O."""
        units: list[Limit] = []
        for c in charges:
            if c.policy is not None:
                self.refuse_known(c.policy, c.key)
                units += (Limit(c.policy, item, c.key, c.cost) for item in c.policy.items)
        return units

    async def _settle(self, units: list[Limit], local: bool) -> None:
        refused = self.local.admit_now(units) if local or self._shared_now() is None else await self._admit(units)
        if refused is not None:
            unit, wait_s = units[refused[0]], max(refused[1], 0.0)
            # Remembered when a cheaper request could not get through either, and not while Redis
            # is down: those local counts are forgotten when it is back.
            if unit.cost <= 1 and wait_s > 0 and (local or self.degraded is None):
                self._remember(unit, wait_s)
            raise _refusal(unit, wait_s)

    async def admit(self, charges: Iterable[Charge], local: bool = False) -> None:
        """Count each charge in order, as separate calls would, and raise 429 for the first limit
        without room (the charges after it are not counted).
        ``local`` counts in this process's memory, whatever the configured storage."""
        units = self._units(charges)
        if units:
            await self._settle(units, local)

    async def count(self, charges: Iterable[Charge]) -> None:
        """``admit`` for a request that is answered already: a refusal now only makes this process
        refuse the next one up front."""
        try:
            await self.admit(charges)
        except RateLimited:
            pass

    def admit_soon(self, charges: Iterable[Charge]) -> asyncio.Future[None] | None:
        """``admit``, with the Redis round trip left running for the caller to await when it must
        know (None when there is nothing to count); a refusal this process remembers raises now."""
        units = self._units(charges)
        if not units:
            return None
        admission = asyncio.ensure_future(self._settle(units, False))
        admission.add_done_callback(_retrieve)  # awaited by the caller, unless it failed before that
        return admission

    @property
    def concurrent(self) -> bool:
        """An inference's model-level admission may run while its inputs travel to the worker."""
        return self.config.admission == "concurrent" and self.shared is not None and self.degraded is None

    async def hit(self, policy: LimitPolicy | None, key: str, cost: int = 1, local: bool = False) -> None:
        """Count ``cost`` against every limit of ``policy`` for ``key``; 429 when one is exceeded."""
        await self.admit((Charge(policy, key, cost),), local)

    async def exceeded(self, policy: LimitPolicy | None, key: str) -> None:
        """Raise 429 if ``policy`` is already used up for ``key``, without counting anything."""
        await self.admit((Charge(policy, key, 0),))

    # -- consecutive failed sign-ins per account (NIST SP 800-63B section 5.2.2) -------------------
    async def account_locked(self, account: str, limit: int | None = None) -> int:
        """Seconds until ``account`` may try again (``limit`` failures, by default
        ``max_failed_logins``), or 0."""
        key = f"gateway/lockout/{account}"
        count = await self._run(lambda b: b.get(key))
        if count < (limit or self.max_failed_logins):
            return 0
        return max(1, math.ceil(await self._run(lambda b: b.ttl(key))))

    async def account_attempt(self, account: str, limit: int | None = None) -> tuple[int, bool]:
        """Take a place for one attempt on ``account`` before its credentials are judged: attempts
        in flight count with the failures against ``limit`` (by default ``max_failed_logins``), so
        guesses sent together cannot all pass a check made before any of them is judged. 0: go
        ahead, then report the verdict with ``account_judged``; else the seconds to wait: the
        lockout's, or one second while the account's other attempts are being judged (``busy``)."""
        failures_key, trying_key = f"gateway/lockout/{account}", f"gateway/trying/{account}"
        limit = limit or self.max_failed_logins
        trying = await self._run(lambda b: b.incr(trying_key, TRYING_TTL_S))
        failures = await self._run(lambda b: b.get(failures_key))
        if failures + trying <= limit:
            return 0, False
        await self._run(lambda b: b.giveback(trying_key))
        if failures < limit:
            return 1, True
        return max(1, math.ceil(await self._run(lambda b: b.ttl(failures_key)))), False

    async def account_judged(self, account: str, verdict: bool | None, limit: int | None = None) -> None:
        """The verdict on an attempt ``account_attempt`` let through: a success clears the account's
        consecutive failures, a failure adds one, and either way the attempt's place is given back
        (None: the factor was never judged)."""
        failures_key = f"gateway/lockout/{account}"
        if verdict is True:
            await self._run(lambda b: b.clear(failures_key))
        elif verdict is False:
            count = await self._run(lambda b: b.incr(failures_key, int(self.lockout_s)))
            if count == (limit or self.max_failed_logins):
                log.warning("account %r locked for up to %d s after %d consecutive failures",
                            account, self.lockout_s, count)
        await self._run(lambda b: b.giveback(f"gateway/trying/{account}"))

    async def first_use(self, key: str, ttl_s: int) -> bool:
        """True the first time ``key`` is used within ``ttl_s`` (by any replica sharing Redis):
        a one-time code is good for one sign-in only."""
        return await self._run(lambda b: b.incr(f"gateway/once/{key}", ttl_s)) == 1

    def status(self) -> dict[str, Any]:
        storage = "redis" if self.shared is not None else "memory"
        if self.degraded is None:
            return {"storage": storage, "shared": self.shared is not None}
        return {"storage": storage, "shared": False, "degraded": f"using local limits: {self.degraded}"}

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
