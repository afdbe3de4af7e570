"""Open Inference Protocol v2 over REST: health, metadata, readiness and inference.

https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
The handlers decode and check tensors against the model's manifest here, in the gateway, and
send only well-formed binary tensors to a worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import __version__
from gateway.config import Config, ModelConfig
from gateway.context import get_context
from gateway.errors import (
    BadRequest,
    ClientClosedRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnsupportedEncoding,
)
from gateway.middleware.limits import principal_key
from gateway.protocol.codec import (
    HEADER_LENGTH,
    DecodeLimits,
    RequestedOutput,
    Tensor,
    decode_infer_request,
    encode_infer_response,
)
from gateway.registry.manifest import NAME_PATTERN, Manifest, load_manifest
from gateway.registry.signature import check_inputs, check_outputs
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.workers.pool import WorkerPool

__all__ = ["ModelEntry", "V2", "routes"]

PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True, slots=True)
class ModelEntry:
    manifest: Manifest
    config: ModelConfig


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


class V2:
    """The protocol's handlers over a model table and a worker pool."""

    def __init__(self, config: Config, models: dict[str, ModelEntry], pool: WorkerPool, policy: Policy,
                 limiter: Limiter) -> None:
        self.config = config
        self.models = models
        self.pool = pool
        self.policy = policy
        self.limiter = limiter
        pool.on_swap.append(self._swapped)
        self.limits = DecodeLimits()

    def _swapped(self, unit: str, manifest_folder: str | None) -> None:
        """The supervisor swapped in, added or (None) removed a served version: follow it."""
        base = self.config.model(unit)
        if manifest_folder is None:
            self.models.pop(unit, None)
        elif base is not None:
            manifest = load_manifest(Path(manifest_folder))
            self.models[unit] = ModelEntry(manifest, dataclasses.replace(base, name=unit, version=manifest.version))

    def _names(self) -> list[str]:
        return sorted(k for k in self.models if "@" not in k)

    def _versions(self, name: str) -> list[str]:
        """The versions served for ``name``, the default first."""
        others = sorted(e.manifest.version for k, e in self.models.items() if k.startswith(f"{name}@"))
        return [self.models[name].manifest.version, *others] if name in self.models else others

    def _model(self, request: Request, verb: str) -> ModelEntry:
        """Authenticate, authorize ``verb`` on the named model, and find it.

        A model that does not exist and one the caller may not see get the same 404, word for word.
        """
        self.policy.authenticated(request.scope)
        name = request.path_params["name"]
        version = request.path_params.get("version")
        shown = name if NAME_PATTERN.match(name) else "requested model"
        missing = NotFound(f"unknown model {shown!r}" + (f" version {version!r}" if version else ""))
        if not NAME_PATTERN.match(name):
            raise missing
        get_context(request.scope).model = name
        try:
            self.policy.authorize(request.scope, verb, name)
        except NotFound:
            raise missing from None
        entry = self.models.get(name)
        if entry is not None and version is not None and version != entry.manifest.version:
            entry = self.models.get(f"{name}@{version}")  # another version served beside the default
        if entry is None:
            raise missing
        return entry

    async def _count(self, request: Request, model: str, inputs: list[Tensor]) -> None:
        """Model-level rate limit and the query budgets (inferences and input rows), after validation."""
        key = f"{principal_key(request.scope)}|{model}"
        rows = int(inputs[0].array.shape[0]) if inputs and inputs[0].array.ndim else 1
        await self.limiter.hit(self.limiter.per_principal_model, key)
        await self.limiter.hit(self.limiter.budget_inferences, key)
        await self.limiter.hit(self.limiter.budget_rows, key, cost=max(1, rows))

    async def model_index(self, request: Request) -> Response:
        """``GET /v2/models``: the models this caller may use (others are not even named)."""
        principal = self.policy.authorize(request.scope, "list")
        names = self.policy.visible_models(principal, self._names())
        return _json({"models": [
            {"name": n, "versions": self._versions(n), "platform": PLATFORM, "ready": self.pool.ready(n)}
            for n in names
        ]})

    async def repository_index(self, request: Request) -> Response:
        """``POST /v2/repository/index`` (Triton's repository extension, as ``tritonclient`` calls it)."""
        principal = self.policy.authorize(request.scope, "list")
        names = self.policy.visible_models(principal, self._names())
        return _json([
            {"name": n, "version": e.manifest.version, "state": "READY" if self.pool.ready(k) else "UNAVAILABLE"}
            for n in names for k, e in sorted(self.models.items()) if k == n or k.startswith(f"{n}@")
        ])

    async def admin_models(self, request: Request) -> Response:
        """``GET /admin/models``: the operator's view, with configuration and execution providers."""
        principal = self.policy.authorize(request.scope, "admin:models")
        units = [k for k in sorted(self.models)
                 if self.policy.decide(principal, "admin:models", k.split("@", 1)[0]).allowed]
        return Response(orjson.dumps({"models": [
            {"name": k.split("@", 1)[0], "version": self.models[k].manifest.version,
             "default": "@" not in k, "sha256": self.models[k].manifest.sha256,
             "ready": self.pool.ready(k), "execution_providers": self.pool.providers(k),
             "config": dataclasses.asdict(self.models[k].config)} for k in units
        ]}), media_type="application/json")

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        if not self.pool.all_ready():
            raise Unavailable("not every model has a healthy worker yet", retry_after=1)
        body: dict[str, Any] = {"ready": True}
        limits = self.limiter.status()
        if "degraded" in limits:
            body["degraded"] = {"limits": limits["degraded"]}  # still serving, with per-process limits
        return _json(body)

    async def server_metadata(self, request: Request) -> Response:
        self.policy.authenticated(request.scope)
        return _json({"name": "gateway", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: Request) -> Response:
        entry = self._model(request, "metadata")
        m = entry.manifest
        versioned = "version" in request.path_params
        return _json({
            "name": m.name,
            "versions": [m.version] if versioned else self._versions(m.name),
            "platform": PLATFORM,
            "inputs": [s.metadata() for s in m.inputs],
            "outputs": [s.metadata() for s in m.outputs],
            "parameters": {"execution_providers": self.pool.providers(entry.config.name)},
        })

    async def model_ready(self, request: Request) -> Response:
        entry = self._model(request, "metadata")
        m, unit = entry.manifest, entry.config.name
        if not self.pool.ready(unit):
            raise Unavailable(f"model {m.name!r} version {m.version!r} has no healthy worker", retry_after=1)
        return _json({"name": m.name, "ready": True,
                      "parameters": {"execution_providers": self.pool.providers(unit)}})

    async def _body(self, request: Request) -> bytes:
        limit = self.config.server.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise UnsupportedEncoding(f"Content-Encoding {encoding[:32]!r} is not accepted; send identity")
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise BadRequest(f"Content-Length must be a byte count, got {declared[:32]!r}", field="Content-Length")
        if declared is not None and int(declared) > limit:
            raise PayloadTooLarge(f"the body may be at most {limit} bytes", limit=limit)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked bodies are counted as they stream
                    raise PayloadTooLarge(f"the body may be at most {limit} bytes", limit=limit)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientClosedRequest("the client closed the connection before sending the whole body") from None
        return b"".join(chunks)

    @staticmethod
    def _header_length(request: Request) -> int | None:
        raw = request.headers.get(HEADER_LENGTH)
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 12:
            raise BadRequest(f"Inference-Header-Content-Length must be a byte count, got {raw[:32]!r}",
                             field="Inference-Header-Content-Length")
        return int(raw)

    async def infer(self, request: Request) -> Response:
        entry = self._model(request, "infer")
        manifest = entry.manifest
        body = await self._body(request)
        req = decode_infer_request(body, self._header_length(request), self.limits)
        inputs = check_inputs(manifest, req.inputs)
        check_outputs(manifest, req.outputs)
        ctx = get_context(request.scope)
        await self._count(request, manifest.name, inputs)
        ctx.extra["version"] = manifest.version
        ctx.extra["inputs"] = [tensor_digest(t) for t in inputs]
        outputs = await self.pool.infer(entry.config.name, inputs, ctx.deadline, ctx.extra)
        selected = _select(outputs, req.outputs, req.binary_output)
        ctx.extra["outputs"] = [tensor_digest(t) for t, _ in selected]
        payload, header_length = encode_infer_response(
            manifest.name, manifest.version, [t for t, _ in selected],
            {t.name for t, binary in selected if binary}, req.id,
        )
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})


def tensor_digest(tensor: Tensor) -> dict[str, Any]:
    """What the audit record keeps of a tensor: its description, size and SHA-256, never its data."""
    array = tensor.array
    h = hashlib.sha256()
    if array.dtype == object:  # BYTES: length-prefixed elements, as the binary extension sends them
        size = 0
        for element in array.reshape(-1):
            h.update(len(element).to_bytes(4, "little"))
            h.update(element)
            size += 4 + len(element)
    else:
        data = np.ascontiguousarray(array)
        h.update(data.data.cast("B"))
        size = data.nbytes
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape), "bytes": size,
            "sha256": h.hexdigest()}


def _select(
    outputs: list[Tensor], requested: list[RequestedOutput], binary_default: bool
) -> list[tuple[Tensor, bool]]:
    if not requested:
        return [(t, binary_default) for t in outputs]
    by_name = {t.name: t for t in outputs}
    return [
        (by_name[r.name], binary_default if r.binary is None else r.binary)
        for r in requested if r.name in by_name
    ]


def routes(v2: V2) -> list[Route]:
    model = "/v2/models/{name:str}"
    versioned = model + "/versions/{version:str}"
    # Inference first: the router tries routes in order, and infer is the hot path.
    out = [Route(model + "/infer", v2.infer, methods=["POST"]),
           Route(versioned + "/infer", v2.infer, methods=["POST"])]
    out += [
        Route("/v2/health/live", v2.live, methods=["GET"]),
        Route("/v2/health/ready", v2.ready, methods=["GET"]),
        Route("/v2", v2.server_metadata, methods=["GET"]),
        Route("/v2/models", v2.model_index, methods=["GET"]),
        Route("/v2/repository/index", v2.repository_index, methods=["POST"]),
        Route("/admin/models", v2.admin_models, methods=["GET"]),
    ]
    for prefix in (model, versioned):
        out += [
            Route(prefix, v2.model_metadata, methods=["GET"]),
            Route(prefix + "/ready", v2.model_ready, methods=["GET"]),
        ]
    return out
