"""The extraction monitor on the request path: its state per principal and model, and its stages.

``ExtractionGate`` (the guard position, before the limits and the model) applies an alarm in
force: ``block`` refuses with 403 ``extraction-suspected``, ``throttle`` counts the request
``throttle_cost`` times against the budgets, ``label_only`` has the output-policy stage answer
one-hot rows. ``ExtractionWatch`` (after ``Infer``, before the output policy) adds the request's
rows to the principal's ``Watch`` and, when the signals fire, raises the alarm: a security event
(ATLAS AML.T0024.002, in the audit chain, the metrics and the webhook) and the configured action,
from this request on, until an operator clears it (``POST /admin/principals/clear``,
``gateway principals clear``).

``WatchStore`` keeps the state. In memory (the default): a bounded LRU of watches per process,
alarms kept apart. With ``limits.storage`` on Redis, every replica sees the same principal: each
request's rows are appended to a capped list per principal and model, the replica whose append
crosses a multiple of ``REDIS_CHECK_EVERY`` replays the list and assesses it (in a thread), and
alarms live in one Redis hash (read on each request; an alarm found is kept for a second, so a
clear reaches every replica within that). A Redis failure falls back to
the local state, logs once, reports ``degraded.extraction`` in readiness, and Redis is tried
again after ``limits.storage_retry_s``; no request fails for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.to_thread

from gateway.access import principal_of
from gateway.config import Config
from gateway.context import Finding, SecurityEvent
from gateway.errors import GatewayError
from gateway.guards.extraction import TECHNIQUE, Assessment, ExtractionModel, Observations, Watch
from gateway.guards.stages import GuardHealth, scores_of
from gateway.security.ratelimit import Limiter
from gateway.stages.base import InferCall, offload

__all__ = ["Alarm", "ExtractionGate", "ExtractionSuspected", "ExtractionWatch", "WatchStore"]

log = logging.getLogger("gateway.extraction")
T = TypeVar("T")
PREFIX = "gateway:extraction:"
REDIS_CHECK_EVERY = 50
"""With Redis, the shared window is replayed and assessed every this many queries of a principal."""
ALARM_CACHE_S = 1.0
KEEP_S = 7 * 86400
"""A principal's shared query window expires after this long without a query."""


class ExtractionSuspected(GatewayError):
    status = 403
    type = "extraction-suspected"
    title = "Queries refused: a model-extraction alarm is in force"


@dataclass(frozen=True)
class Alarm:
    principal: str
    model: str
    action: str
    score: float
    signals: dict[str, float]
    queries: int
    request_id: str
    event_id: str
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def watch_key(model: str, principal: str) -> str:
    return f"{model}|{principal}"


class WatchStore:
    """Watches and alarms, in this process or in Redis (see the module's text)."""

    def __init__(self, config: Config) -> None:
        self.limits = config.limits
        self.windows = {m.name: m.extraction.window for m in config.models}
        self.max_watches = max((m.extraction.max_principals for m in config.models), default=1000)
        self.watches: OrderedDict[str, Watch] = OrderedDict()
        self.alarms: dict[str, Alarm] = {}
        self._cached: dict[str, tuple[float, Alarm | None]] = {}
        self.redis: Any = None
        if config.limits.shared and any(m.extraction.enabled for m in config.models):
            import redis.asyncio

            timeout = config.limits.storage_timeout_s
            self.redis = redis.asyncio.from_url(config.limits.storage, socket_timeout=timeout,
                                                socket_connect_timeout=timeout)
        self.degraded: str | None = None
        self.retry_at = 0.0

    async def _shared(self, call: Callable[[Any], Awaitable[T]]) -> T | None:
        """``call(redis)``, or None when there is no Redis or it failed (then local state serves)."""
        if self.redis is None or time.monotonic() < self.retry_at:
            return None
        try:
            result = await asyncio.wait_for(call(self.redis), self.limits.storage_timeout_s)
        except Exception as exc:  # never a 500: the local state watches meanwhile
            reason = f"{type(exc).__name__}: {exc}"[:200]
            if self.degraded is None:
                log.warning("extraction-monitor storage unreachable (%s); watching per process", reason)
            self.degraded, self.retry_at = reason, time.monotonic() + self.limits.storage_retry_s
            return None
        if self.degraded is not None:
            log.warning("extraction-monitor storage is back; watching across replicas again")
            self.degraded = None
        return result

    # -- alarms -------------------------------------------------------------------------------------
    async def alarm(self, key: str) -> Alarm | None:
        local = self.alarms.get(key)
        if local is not None or self.redis is None:
            return local
        now = time.monotonic()
        cached = self._cached.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self._shared(lambda r: r.hget(PREFIX + "alarms", key))
        alarm = Alarm(**json.loads(raw)) if raw else None
        if alarm is not None:  # only alarms are cached: one raised anywhere applies here at once
            self._cached[key] = (now + ALARM_CACHE_S, alarm)
        return alarm

    async def raise_alarm(self, key: str, alarm: Alarm) -> None:
        """Shared when Redis takes it (so that a clear on any replica lifts it), else kept here."""
        self.watches.pop(key, None)
        if await self._shared(lambda r: r.hset(PREFIX + "alarms", key, json.dumps(alarm.as_dict()))) is None:
            self.alarms[key] = alarm
        self._cached[key] = (time.monotonic() + ALARM_CACHE_S, alarm)

    async def in_force(self) -> list[Alarm]:
        shared = await self._shared(lambda r: r.hgetall(PREFIX + "alarms")) or {}
        alarms = {**{k.decode(): Alarm(**json.loads(v)) for k, v in shared.items()}, **self.alarms}
        return sorted(alarms.values(), key=lambda a: a.time)

    async def clear(self, principal: str, model: str | None) -> list[Alarm]:
        """Forget the principal's alarms and watches (for one model, or all); the alarms cleared."""
        cleared = [a for a in await self.in_force() if a.principal == principal and model in (None, a.model)]
        keys = {watch_key(m, principal) for m in ([model] if model else self.windows)}
        keys |= {watch_key(a.model, a.principal) for a in cleared}
        for key in keys:
            self.alarms.pop(key, None)
            self.watches.pop(key, None)
            self._cached.pop(key, None)

        async def forget(r: Any) -> None:
            pipe = r.pipeline(transaction=False)
            pipe.hdel(PREFIX + "alarms", *keys)
            pipe.delete(*(PREFIX + "obs:" + k for k in keys), *(PREFIX + "count:" + k for k in keys))
            await pipe.execute()

        await self._shared(forget)
        return cleared

    # -- watching -----------------------------------------------------------------------------------
    async def observe(self, key: str, model: ExtractionModel, obs: Observations) -> Assessment | None:
        """Add ``obs`` to the principal's window; an assessment when one was made."""
        assessed = await self._observe_shared(key, model, obs)
        if not isinstance(assessed, bool):
            return assessed
        watch = self.watches.get(key)
        if watch is None:
            watch = self.watches[key] = Watch(model.config.window, model.config.min_queries)
            while len(self.watches) > self.max_watches:
                self.watches.popitem(last=False)
        else:
            self.watches.move_to_end(key)
        watch.observe(obs)
        return watch.assess(model.config)

    async def _observe_shared(self, key: str, model: ExtractionModel, obs: Observations) -> Assessment | None | bool:
        """False when Redis did not take it (none, or down)."""
        if self.redis is None:
            return False
        window = model.config.window

        async def push(r: Any) -> int:
            pipe = r.pipeline(transaction=False)
            pipe.rpush(PREFIX + "obs:" + key, *obs.pack())
            pipe.ltrim(PREFIX + "obs:" + key, -window, -1)
            pipe.expire(PREFIX + "obs:" + key, KEEP_S)
            pipe.incrby(PREFIX + "count:" + key, len(obs))
            pipe.expire(PREFIX + "count:" + key, KEEP_S)
            return int((await pipe.execute())[3])

        count = await self._shared(push)
        if count is None:
            return False
        if (count - len(obs)) // REDIS_CHECK_EVERY == count // REDIS_CHECK_EVERY:
            return None
        records = await self._shared(lambda r: r.lrange(PREFIX + "obs:" + key, 0, -1))
        if not records:
            return None

        def replay() -> Assessment:
            watch = Watch(window, model.config.min_queries)
            watch.observe(Observations.unpack(records, model.width))
            return watch.assess(model.config)

        return await anyio.to_thread.run_sync(replay)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


def _apply(call: InferCall, alarm: Alarm, limiter: Limiter, cost: int) -> Awaitable[None] | None:
    """What an alarm does to this request (a coroutine to await when it charges the budgets)."""
    if alarm.action == "block":
        raise ExtractionSuspected(f"queries to {alarm.model} from this principal are refused since {alarm.time} "
                                  "(a model-extraction alarm); an operator can clear it", technique=TECHNIQUE)
    if alarm.action == "label_only":
        call.policy_floor = "label_only"
    elif alarm.action == "throttle" and limiter.budget_inferences is not None and cost > 1:
        return limiter.hit(limiter.budget_inferences, f"{alarm.principal}|{alarm.model}", cost=cost - 1)
    return None


RESTRICTED = {"label_only": "its answers are label-only", "throttle": "its queries are throttled",
              "block": "its queries are refused"}


class ExtractionGate:
    """An alarm in force, applied before the model runs. Before an explanation (``explain``), any
    alarm that does more than record refuses it: an explanation is thousands of answers and a
    gradient, more than a principal whose answers are restricted may have."""

    name = "extraction-gate"

    def __init__(self, store: WatchStore, limiter: Limiter, explain: bool = False) -> None:
        self.store = store
        self.limiter = limiter
        self.explain = explain

    async def __call__(self, call: InferCall) -> None:
        monitor = call.model.extraction
        if monitor is None:
            return
        principal = principal_of(call.ctx)
        alarm = await self.store.alarm(watch_key(call.model.unit.model, principal.key))
        if alarm is None:
            return
        call.extraction_alarm = True
        call.ctx.findings.append(Finding("extraction", "extraction-alarm", f"alarm of {alarm.time} in force",
                                         alarm.action, TECHNIQUE, alarm.score))
        if self.explain and alarm.action != "record":
            raise ExtractionSuspected(f"explanations of {alarm.model} are refused to this principal since {alarm.time} "
                                      f"(a model-extraction alarm: {RESTRICTED[alarm.action]}); an operator can clear it",
                                      technique=TECHNIQUE)
        charge = _apply(call, alarm, self.limiter, monitor.config.throttle_cost)
        if charge is not None:
            await charge


class ExtractionWatch:
    """The request's rows into the principal's window; an alarm when the signals fire."""

    name = "extraction-watch"

    def __init__(self, store: WatchStore, limiter: Limiter, health: GuardHealth) -> None:
        self.store = store
        self.limiter = limiter
        self.health = health

    async def __call__(self, call: InferCall) -> None:
        monitor = call.model.extraction
        if monitor is None or call.ctx.error is not None or call.extraction_alarm:
            return
        ctx = call.ctx
        principal = principal_of(ctx)
        model = call.model.unit.model
        key = watch_key(model, principal.key)
        try:
            x, output = call.inputs[0].array, scores_of(call, call.outputs)
            obs = await offload(x.size, monitor.observations, x, output)
            assessment = await self.store.observe(key, monitor, obs)
        except Exception as exc:  # the monitor's failure is never the request's 500
            why = f"{type(exc).__name__}: {exc}"[:300]
            self.health.failed(f"{model} (extraction)", why)
            log.warning("extraction monitor of %s failed on request %s: %s", model, ctx.request_id, why)
            return
        if assessment is None or not assessment.fired:
            return
        action = monitor.config.action_for(principal.roles)
        event = SecurityEvent(
            principal=principal.key, model=model, version=call.model.manifest.version, detector="extraction",
            score=assessment.score, threshold=1.0, action=action, technique=TECHNIQUE, request_id=ctx.request_id,
            scores={**assessment.signals, "queries": float(assessment.queries)})
        alarm = Alarm(principal.key, model, action, round(assessment.score, 4),
                      {k: round(v, 4) for k, v in assessment.signals.items()}, assessment.queries,
                      ctx.request_id, event.event_id)
        await self.store.raise_alarm(key, alarm)
        ctx.events.append(event)
        ctx.findings.append(Finding("extraction", "extraction-alarm",
                                    f"signals {', '.join(assessment.fired)} after {assessment.queries} queries",
                                    action, TECHNIQUE, assessment.score))
        log.warning("extraction alarm: %s on %s after %d queries (%s); action %s", principal.key, model,
                    assessment.queries, ", ".join(assessment.fired), action)
        charge = _apply(call, alarm, self.limiter, monitor.config.throttle_cost)
        if charge is not None:
            await charge

