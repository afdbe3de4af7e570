"""A plain-HTTP listener for orchestrator probes: only ``/v2/health/live`` and ``/v2/health/ready``.

Kubernetes probes and Docker's HEALTHCHECK cannot present a client certificate, so when
``server.probe_port`` is set this tiny app answers them on a separate port. It reveals nothing
but liveness and readiness; every other path is 404.
"""

from __future__ import annotations

import os
from typing import Any

from gateway.config import load_config
from gateway.routes import LIVENESS_PATH, READINESS_PATH
from gateway.workers.pool import WorkerPool

__all__ = ["ProbeApp", "probe_app_from_environment"]


class ProbeApp:
    def __init__(self, pool: WorkerPool, ready_when: str = "all") -> None:
        self.pool = pool
        self.ready_when = ready_when

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.pool.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.pool.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == LIVENESS_PATH:
            status, body = 200, b'{"live":true}'
        elif path == READINESS_PATH:
            ok = self.pool.is_ready(self.ready_when)
            status, body = (200, b'{"ready":true}') if ok else (503, b'{"ready":false}')
        else:
            status, body = 404, b'{"error":"not found"}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def probe_app_from_environment() -> ProbeApp:
    config = load_config(os.environ["GATEWAY_CONFIG"])
    return ProbeApp(WorkerPool(config, os.environ["GATEWAY_RUNTIME_DIR"]), config.server.ready_when)
