"""The gateway's side of the workers: one transport per worker, least-loaded routing.

Which workers serve which unit comes from the supervisor's ``routes.json`` (in the runtime
directory, which only the gateway can write), with each worker's address and the process and
user it must be. Each serving process keeps its own view of worker health: a worker is taken out
of rotation the moment a request to it fails at the transport level, and a background task
probes it back in. A request caught on a dead worker answers 503 with ``Retry-After``; one that
never reached a worker (connection refused, or an impostor at the address) is retried once on
another. A request past its deadline answers 504.

Transports are made by ``connect`` (Unix sockets by default); ``WorkerPool.of`` builds a pool over
given transports (``InMemoryTransport`` in tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.config import Config
from gateway.errors import BadModelAnswer, GatewayError, GatewayTimeout, InvalidInput, Unavailable
from gateway.units import Unit
from gateway.workers.local import UnixSocketTransport
from gateway.workers.remote import TLSTransport, client_context
from gateway.workers.transport import (
    AnswerTooLarge,
    PeerCredentials,
    WorkerConnectError,
    WorkerConnectionLost,
    WorkerImpostor,
    WorkerRefused,
    WorkerTransport,
)
from gateway_client.protocol.codec import Tensor

__all__ = ["ROUTES", "ModelExecutionError", "WorkerClient", "WorkerPool"]

log = logging.getLogger("gateway.pool")

ROUTES = "routes.json"
"""In the runtime directory: which workers serve which unit now (written atomically by the
supervisor at start-up, at every swap and at every worker restart; read by the serving processes)."""


class ModelExecutionError(GatewayError):
    status = 500
    type = "model-execution"
    title = "The model failed to run"


@dataclass(eq=False)
class WorkerClient:
    unit: str
    index: int
    transport: WorkerTransport
    max_inflight: int
    healthy: bool = False
    inflight: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    """Times the supervisor restarted this worker's process (from ``routes.json``)."""
    endpoint: str = ""
    """A remote worker host's address; "" for a local worker."""
    failures: int = 0
    """Probes failed in a row since it left rotation; each doubles the wait before the next."""
    strikes: int = 0
    """Requests failed in a row on it (an endpoint leaves rotation at ``remote_workers.eject_after``)."""
    ejections: int = 0
    """Times an endpoint left rotation for failed requests with none served since; from the
    second, each doubles how long it is held out (up to ``remote_workers.max_ejection_s``)."""
    ejected: int = 0
    """Times an endpoint left rotation for failed requests since start-up (a metric)."""
    retry_at: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.unit}@{self.endpoint}" if self.endpoint else f"{self.unit}-{self.index}"

    async def probe(self) -> bool:
        self.info = await self.transport.health(timeout=2.0) or {}
        self.healthy = bool(self.info.get("ready"))
        return self.healthy


Connect = Callable[[dict[str, Any], int], WorkerTransport]
"""Makes the transport of one worker from its entry in ``routes.json`` and its unit's max in-flight."""


def unix_socket(entry: dict[str, Any], max_inflight: int) -> WorkerTransport:
    return UnixSocketTransport(str(entry["socket"]), max_connections=max_inflight, credentials=_credentials(entry))


class WorkerPool:
    probe_interval_s = 0.5
    backoff_max_s = 8.0

    def __init__(self, config: Config, runtime_dir: str | Path | None, connect: Connect = unix_socket) -> None:
        self.config = config
        self.routes_path = Path(runtime_dir) / ROUTES if runtime_dir is not None else None
        """The supervisor's routes; None for a pool over given transports (``of``)."""
        self.connect = connect
        self.remote = remote_clients(config) if runtime_dir is not None else {}
        """The worker hosts of each model's ``endpoints``, beside whatever local workers it has."""
        self.workers: dict[str, list[WorkerClient]] = {unit.key: list(self.remote.get(unit.key, []))
                                                       for unit, _ in config.units()}
        """Keyed by unit (``Unit.key``): the model's name for its default version, ``name@version``."""
        self.generations: dict[str, int] = {}
        self.on_swap: list[Callable[[str, str | None], None]] = []
        """Called with (unit key, manifest folder) when the supervisor swapped in, added (or, with
        None, removed) a model version."""
        self._routes_mtime = 0
        self.supervision: dict[str, Any] = {}
        """The supervisor's record of refused and quarantined model versions (from ``routes.json``)."""
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, config: Config, transports: dict[str, list[WorkerTransport]]) -> WorkerPool:
        """A pool over the given transports, per unit key (no supervisor, no routes file)."""
        pool = cls(config, None)
        for key, group in transports.items():
            pool.workers[key] = [WorkerClient(key, i, t, pool._max_inflight(key)) for i, t in enumerate(group)]
        return pool

    async def start(self) -> None:
        await self._follow_routes()
        await asyncio.gather(*(w.probe() for ws in self.workers.values() for w in ws))
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.transport.aclose() for ws in self.workers.values() for w in ws))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self._follow_routes()
            await self._probe_down()

    async def _probe_down(self) -> None:
        """Probe the workers out of rotation whose back-off is over: back in rotation when one
        answers ready, else the wait doubles (up to ``backoff_max_s``)."""
        now = time.monotonic()
        down = [w for ws in self.workers.values() for w in ws if not w.healthy and w.retry_at <= now]
        if not down:
            return
        await asyncio.gather(*(w.probe() for w in down))
        for w in down:
            if w.healthy:
                if w.failures or w.ejections:
                    log.warning("worker %s back in rotation", w.name)
                w.failures = w.strikes = 0
            else:
                w.failures += 1
                w.retry_at = time.monotonic() + min(self.backoff_max_s, self.probe_interval_s * 2 ** min(w.failures, 8))

    async def _follow_routes(self) -> None:
        """Swap to the workers the supervisor's routes name, once they answer; old clients drain.
        A restarted worker (same unit and generation, new process) is expected under its new pid."""
        if self.routes_path is None:
            return
        try:
            mtime = self.routes_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._routes_mtime:
            return
        try:
            document = orjson.loads(self.routes_path.read_bytes())
            routes = document["models"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # mid-replace or unreadable: next round
        self._routes_mtime = mtime
        self.supervision = document.get("supervision") or {}
        for key, route in routes.items():
            if self.config.model(Unit.parse(key).model) is None:
                continue  # not a model this process was configured with
            if route["generation"] == self.generations.get(key):
                for client, entry in zip(self.workers.get(key, []), route["workers"]):
                    client.transport.expect(_credentials(entry))
                    client.restarts = int(entry.get("restarts", 0))
                continue
            await self._swap(key, route)
        for key in [k for k in self.workers if k in self.generations and k not in routes]:  # no longer served
            old = [w for w in self.workers.pop(key) if not w.endpoint]
            self.generations.pop(key, None)
            for callback in self.on_swap:
                callback(key, None)
            asyncio.get_running_loop().create_task(self._close_later(old))

    def _max_inflight(self, key: str) -> int:
        m = self.config.model(Unit.parse(key).model)
        return m.max_inflight if m is not None else 256

    async def _swap(self, key: str, route: dict[str, Any]) -> None:
        limit = self._max_inflight(key)
        fresh = [WorkerClient(key, i, self.connect(entry, limit), limit, restarts=int(entry.get("restarts", 0)))
                 for i, entry in enumerate(route["workers"])]
        await asyncio.gather(*(w.probe() for w in fresh))
        old = [w for w in self.workers.get(key, []) if not w.endpoint]
        self.workers[key] = fresh + self.remote.get(key, [])
        first = key not in self.generations
        self.generations[key] = route["generation"]
        if not first:
            log.info("model %s now served by version %s (generation %d)", key, route["version"], route["generation"])
        for callback in self.on_swap:
            callback(key, route["manifest"])
        asyncio.get_running_loop().create_task(self._close_later(old))

    async def _close_later(self, clients: list[WorkerClient]) -> None:
        """Requests already on the old workers finish before their connections are closed."""
        await asyncio.sleep(self.config.server.request_timeout_s + 1.0)
        await asyncio.gather(*(w.transport.aclose() for w in clients))

    async def refresh(self) -> None:
        """Read the supervisor's routes and probe every worker now (fresh restarts, refusals, queue
        depth and batch statistics for metrics)."""
        await self._follow_routes()
        await asyncio.gather(*(w.probe() for ws in self.workers.values() for w in ws))

    # views ---------------------------------------------------------------------------------
    def ready(self, key: str) -> bool:
        return any(w.healthy for w in self.workers.get(key, ()))

    def all_ready(self) -> bool:
        return all(self.ready(k) for k in self.workers)

    def is_ready(self, when: str) -> bool:
        """Readiness as ``server.ready_when`` asks: every model servable ("all"), or one ("any")."""
        return self.all_ready() if when == "all" else any(self.ready(k) for k in self.workers)

    def not_ready(self) -> list[str]:
        return sorted(k for k in self.workers if not self.ready(k))

    def providers(self, key: str) -> list[str]:
        return next((w.info.get("providers", []) for w in self.workers.get(key, ()) if w.healthy), [])

    # routing -------------------------------------------------------------------------------
    def _pick(self, key: str, exclude: WorkerClient | None = None) -> WorkerClient:
        candidates = [w for w in self.workers.get(key, ()) if w.healthy and w is not exclude]
        if not candidates:
            raise Unavailable(f"no healthy worker for model {key!r}; retry shortly", retry_after=1)
        best = min(candidates, key=lambda w: w.inflight)
        if best.inflight >= best.max_inflight:
            raise Unavailable(f"model {key!r} is at capacity; retry shortly", retry_after=1)
        return best

    async def infer(self, key: str, inputs: list[Tensor], deadline: float | None = None,
                    picked: Callable[[str], None] | None = None, limit: int | None = None) -> list[Tensor]:
        """Run ``inputs`` on the least-loaded healthy worker of unit ``key``; ``picked`` hears its
        name. ``limit``: the most bytes its answer can hold (``answer_bound``), where known."""
        refused: WorkerClient | None = None
        for _ in range(2):  # a refused connection reached no worker: safe to try another, once
            worker = self._pick(key, exclude=refused)
            if picked is not None:
                picked(worker.name)
            try:
                return await self._send(worker, inputs, deadline, limit)
            except WorkerImpostor:
                self._mark_down(worker, "not the expected worker process")
                refused = worker
            except WorkerConnectError:
                self._mark_down(worker, "connection refused")
                refused = worker
        raise Unavailable(f"no worker of model {key!r} accepted the request", retry_after=1)

    def _mark_down(self, worker: WorkerClient, why: str) -> None:
        if worker.healthy:
            log.warning("worker %s out of rotation: %s", worker.name, why)
        worker.healthy = False

    def _eject(self, worker: WorkerClient, why: str) -> None:
        """An endpoint out of rotation for failing requests: probed back at once the first time,
        held out for 1, 2, 4 ... s when it fails again before serving one (outlier ejection: its
        health checks alone cannot be trusted then)."""
        if not worker.healthy:
            return  # already out: the other requests that were on it when it failed
        worker.ejections += 1
        worker.ejected += 1
        if worker.ejections > 1:
            hold = min(self.config.remote_workers.max_ejection_s, 2.0 ** (worker.ejections - 2))
            worker.retry_at = time.monotonic() + hold
            why = f"{why}; held out for {hold:g} s (ejection {worker.ejections} with no request served between)"
        self._mark_down(worker, why)

    async def _send(self, worker: WorkerClient, inputs: list[Tensor], deadline: float | None,
                    limit: int | None) -> list[Tensor]:
        timeout = self.config.server.request_timeout_s
        if deadline is not None:
            timeout = max(0.001, deadline - time.monotonic())
        worker.inflight += 1
        try:
            outputs = await worker.transport.infer(inputs, timeout, limit)
            worker.strikes = worker.ejections = 0
            return outputs
        except TimeoutError:
            raise GatewayTimeout(f"model {worker.unit!r} did not answer within {timeout:.1f}s") from None
        except WorkerConnectionLost as exc:
            worker.strikes += 1
            if not worker.endpoint:
                self._mark_down(worker, str(exc))
            elif worker.strikes >= self.config.remote_workers.eject_after:
                self._eject(worker, str(exc))
            if isinstance(exc, AnswerTooLarge):
                log.error("SECURITY: %s answered past the gateway's bound: %s", worker.name, exc)
                raise BadModelAnswer(f"model {worker.unit!r} answered more than the gateway accepts for the request "
                                     "(its signature's bound, or its worker's answers in flight); nothing of it "
                                     "was kept") from None
            raise Unavailable(
                f"the worker serving {worker.unit!r} failed during the request; retry shortly", retry_after=1,
            ) from None
        except WorkerRefused as exc:
            if exc.status == 504:  # the worker dropped it: the deadline passed while it queued
                raise GatewayTimeout(f"model {worker.unit!r} did not answer within {timeout:.1f}s") from None
            if exc.status in (400, 422):
                raise InvalidInput(f"model {worker.unit!r} rejected the input: {exc.detail}") from None
            raise ModelExecutionError(f"model {worker.unit!r} failed: {exc.detail}") from None
        finally:
            worker.inflight -= 1


def remote_clients(config: Config) -> dict[str, list[WorkerClient]]:
    """A client per worker host of each model's ``endpoints``, over mutual TLS."""
    served = [m for m in config.models if m.endpoints]
    if not served:
        return {}
    r = config.remote_workers
    context = client_context(r.cert_file, r.key_file, r.ca_file)
    return {m.name: [WorkerClient(m.name, i, TLSTransport(e, context, r.identity, m.max_inflight,
                                                          r.answers_in_flight_mb << 20),
                                  m.max_inflight, endpoint=e) for i, e in enumerate(m.endpoints)] for m in served}


def _credentials(entry: dict[str, Any]) -> PeerCredentials | None:
    return PeerCredentials(int(entry["pid"]), int(entry["uid"])) if entry.get("pid") else None
