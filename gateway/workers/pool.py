"""The gateway's side of the workers: one HTTP client per worker socket, least-loaded routing.

Each gateway process keeps its own view of worker health: a worker is taken out of rotation the
moment a request to it fails at the transport level, and a background task probes it back in.
A request caught on a dead worker answers 503 with ``Retry-After``; one that never reached a
worker (connection refused) is retried once on another. A request past its deadline answers 504.
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

from gateway.config import Config, ModelConfig
from gateway.errors import GatewayError, GatewayTimeout, InvalidInput, Unavailable
from gateway.protocol.codec import HEADER_LENGTH, Chunk, Tensor, decode_tensor_message, encode_tensor_parts
from gateway.workers.supervisor import ROUTES, socket_path
from gateway.workers.transport import (
    UnixHTTPClient,
    WorkerConnectError,
    WorkerConnectionLost,
    WorkerResponse,
)

__all__ = ["WorkerClient", "WorkerPool"]

log = logging.getLogger("gateway.pool")


class ModelExecutionError(GatewayError):
    status = 500
    type = "model-execution"
    title = "The model failed to run"


@dataclass(eq=False)
class WorkerClient:
    model: str
    index: int
    socket: Path
    max_inflight: int
    healthy: bool = False
    inflight: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    client: UnixHTTPClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = UnixHTTPClient(str(self.socket), max_connections=self.max_inflight)

    async def probe(self) -> bool:
        try:
            response = await self.client.request("GET", "/health", timeout=2.0)
            self.info = orjson.loads(response.body) if response.status == 200 else {}
            self.healthy = bool(self.info.get("ready"))
        except (ConnectionError, TimeoutError, orjson.JSONDecodeError):
            self.healthy = False
        return self.healthy


class WorkerPool:
    probe_interval_s = 0.5

    def __init__(self, config: Config, runtime_dir: str | Path) -> None:
        self.config = config
        self.routes_path = Path(runtime_dir) / ROUTES
        # Keyed by served unit: a model's name for its default version, ``name@version`` for others.
        self.workers: dict[str, list[WorkerClient]] = {
            m.name: [self._client(m, i, socket_path(runtime_dir, m.name, i)) for i in range(m.workers)]
            for m in config.units()
        }
        self.generations: dict[str, int] = {m.name: 0 for m in config.units()}
        self.on_swap: list[Callable[[str, str | None], None]] = []
        """Called with (unit, manifest folder) when the supervisor swapped in, added (or, with
        None, removed) a model version."""
        self._routes_mtime = 0
        self._task: asyncio.Task[None] | None = None

    def _client(self, m: ModelConfig, index: int, socket: Path) -> WorkerClient:
        return WorkerClient(m.name, index, socket, m.max_inflight)

    async def start(self) -> None:
        await self._follow_routes()
        await asyncio.gather(*(w.probe() for ws in self.workers.values() for w in ws))
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(w.client.aclose() for ws in self.workers.values() for w in ws))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self._follow_routes()
            down = [w for ws in self.workers.values() for w in ws if not w.healthy]
            if down:
                await asyncio.gather(*(w.probe() for w in down))

    async def _follow_routes(self) -> None:
        """Swap to the workers the supervisor's routes name, once they answer; old clients drain."""
        try:
            mtime = self.routes_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._routes_mtime:
            return
        try:
            routes = orjson.loads(self.routes_path.read_bytes())["models"]
        except (OSError, ValueError, KeyError):
            return  # mid-replace or unreadable: next round
        self._routes_mtime = mtime
        for name, route in routes.items():
            m = self.config.model(name)
            if m is None or route["generation"] == self.generations.get(name):
                continue
            fresh = [self._client(m, i, Path(sock)) for i, sock in enumerate(route["sockets"])]
            await asyncio.gather(*(w.probe() for w in fresh))
            old, self.workers[name] = self.workers.get(name, []), fresh
            self.generations[name] = route["generation"]
            log.info("model %s now served by version %s (generation %d)", name, route["version"], route["generation"])
            for callback in self.on_swap:
                callback(name, route["manifest"])
            asyncio.get_running_loop().create_task(self._close_later(old))
        for name in [n for n in self.workers if n not in routes]:  # a version no longer served
            old = self.workers.pop(name)
            self.generations.pop(name, None)
            for callback in self.on_swap:
                callback(name, None)
            asyncio.get_running_loop().create_task(self._close_later(old))

    async def _close_later(self, clients: list[WorkerClient]) -> None:
        """Requests already on the old workers finish before their connections are closed."""
        await asyncio.sleep(self.config.server.request_timeout_s + 1.0)
        await asyncio.gather(*(w.client.aclose() for w in clients))

    async def refresh(self) -> None:
        """Probe every worker now (fresh queue depth and batch statistics for metrics)."""
        await asyncio.gather(*(w.probe() for ws in self.workers.values() for w in ws))

    # views ---------------------------------------------------------------------------------
    def ready(self, model: str) -> bool:
        return any(w.healthy for w in self.workers.get(model, ()))

    def all_ready(self) -> bool:
        return all(self.ready(m) for m in self.workers)

    def providers(self, model: str) -> list[str]:
        return next((w.info.get("providers", []) for w in self.workers.get(model, ()) if w.healthy), [])

    # routing -------------------------------------------------------------------------------
    def _pick(self, model: str, exclude: WorkerClient | None = None) -> WorkerClient:
        candidates = [w for w in self.workers[model] if w.healthy and w is not exclude]
        if not candidates:
            raise Unavailable(f"no healthy worker for model {model!r}; retry shortly", retry_after=1)
        best = min(candidates, key=lambda w: w.inflight)
        if best.inflight >= best.max_inflight:
            raise Unavailable(f"model {model!r} is at capacity; retry shortly", retry_after=1)
        return best

    async def infer(self, model: str, inputs: list[Tensor], deadline: float | None = None,
                    trace: dict[str, Any] | None = None) -> list[Tensor]:
        """Run ``inputs`` on the least-loaded healthy worker; ``trace["worker"]`` names the one used."""
        body, header_length = encode_tensor_parts("inputs", inputs)
        refused: WorkerClient | None = None
        for _ in range(2):  # a refused connection reached no worker: safe to try another, once
            worker = self._pick(model, exclude=refused)
            if trace is not None:
                trace["worker"] = f"{worker.model}-{worker.index}"
            try:
                return await self._send(worker, body, header_length, deadline)
            except WorkerConnectError:
                self._mark_down(worker, "connection refused")
                refused = worker
        raise Unavailable(f"no worker of model {model!r} accepted the request", retry_after=1)

    def _mark_down(self, worker: WorkerClient, why: str) -> None:
        if worker.healthy:
            log.warning("worker %s-%d out of rotation: %s", worker.model, worker.index, why)
        worker.healthy = False

    async def _send(
        self, worker: WorkerClient, body: list[Chunk], header_length: int, deadline: float | None
    ) -> list[Tensor]:
        timeout = self.config.server.request_timeout_s
        if deadline is not None:
            timeout = max(0.001, deadline - time.monotonic())
        worker.inflight += 1
        try:
            response = await worker.client.request(
                "POST", "/infer", body, {HEADER_LENGTH: str(header_length)}, timeout=timeout
            )
        except TimeoutError:
            raise GatewayTimeout(f"model {worker.model!r} did not answer within {timeout:.1f}s") from None
        except WorkerConnectionLost as exc:
            self._mark_down(worker, str(exc))
            raise Unavailable(
                f"the worker serving {worker.model!r} failed during the request; retry shortly",
                retry_after=1,
            ) from None
        finally:
            worker.inflight -= 1
        if response.status != 200:
            detail = _worker_error(response)
            if response.status in (400, 422):
                raise InvalidInput(f"model {worker.model!r} rejected the input: {detail}")
            raise ModelExecutionError(f"model {worker.model!r} failed: {detail}")
        return decode_tensor_message(response.body, int(response.headers[HEADER_LENGTH.encode()]), "outputs")


def _worker_error(response: WorkerResponse) -> str:
    try:
        return str(orjson.loads(response.body).get("error", ""))[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return f"status {response.status}"
