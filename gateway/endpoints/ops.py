"""Endpoints for operators and tools: the OpenAPI document and Prometheus metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.access import authorize
from gateway.context import get_context
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.security.rbac import Policy

__all__ = ["OpsEndpoints"]


class OpsEndpoints:
    def __init__(self, document: bytes, metrics: Metrics, policy: Policy) -> None:
        self.document = document
        self._metrics = metrics
        self.policy = policy

    async def openapi(self, request: Request) -> Response:
        return Response(self.document, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        authorize(get_context(request.scope), self.policy, "metrics")
        return Response(await self._metrics.render(), media_type=CONTENT_TYPE)
