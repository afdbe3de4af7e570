"""The route table: every path the gateway serves, once.

Each entry says the path, its methods, which object's handler answers it, the RBAC verb the
handler asks for, whether it is public (no token; the TLS layer still asks for a certificate) or
a health probe, and what the OpenAPI document says of it. The Starlette routes, the exemptions
of the authentication, limit and audit layers, and the paths of ``/openapi.json`` are all
derived from this list; a test holds the served routes and the document to each other.

To add a route: one ``RouteSpec`` here and the handler on its owner (``Endpoints`` in
``gateway.endpoints``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.routing import Route

from gateway.security.incidents import ACTIONS as INCIDENT_ACTIONS
from gateway.security.issuer import JWKS_PATH, TOKEN_PATH

__all__ = ["LIVENESS_PATH", "PROBE_PATHS", "PUBLIC_PATHS", "READINESS_PATH", "ROUTES", "GatewayRoute", "Operation",
           "RouteSpec", "starlette_routes"]

Owner = Literal["v2", "issuer", "ops", "incident"]
Probe = Literal["live", "ready"]


@dataclass(frozen=True, slots=True)
class Operation:
    """What the OpenAPI document says of a route beyond its path: the answer and the refusals."""

    summary: str
    ok: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    media: str = "application/json"
    problems: tuple[int, ...] = ()
    request_body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RouteSpec:
    path: str
    """Starlette's path syntax (``{name:str}``); the document shows ``{name}``."""
    methods: tuple[str, ...]
    owner: Owner
    handler: str
    """The owner's method that answers; also the route's name in metrics and audit records."""
    doc: Operation
    verb: str | None = None
    """The RBAC verb the handler asks for; None where being authenticated (or public) is enough."""
    public: bool = False
    """No token needed."""
    probe: Probe | None = None
    """A health probe: no token, no per-address request limit of its own kind, also served on the
    plain-HTTP probe port; liveness is answered even while the audit log cannot be written."""

    @property
    def document_path(self) -> str:
        return self.path.replace(":str}", "}")


class GatewayRoute(Route):
    """A Starlette route that remembers its table entry (``scope["route"].spec``)."""

    def __init__(self, spec: RouteSpec, endpoint: Callable[..., Any]) -> None:
        super().__init__(spec.path, endpoint, methods=list(spec.methods), name=spec.handler)
        self.spec = spec


MODEL = "/v2/models/{name:str}"
VERSIONED = MODEL + "/versions/{version:str}"

_INFER = Operation("Inference (verb: infer)", {"$ref": "#/components/schemas/InferResponse"}, problems=(404, 422, 499, 504),
                   request_body={"required": True, "content": {"application/json": {
                       "schema": {"$ref": "#/components/schemas/InferRequest"}}}})
_EXPLAIN = Operation(
    "Integrated-gradients attributions for one input row (verb: explain; costs its model evaluations)",
    {"type": "object", "required": ["model_name", "method", "target", "attributions", "completeness_delta"]},
    problems=(404, 422, 429, 504), request_body={"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/InferRequest"}}}})
_META = Operation("Model metadata (verb: metadata)", {"$ref": "#/components/schemas/ModelMetadata"}, problems=(404,))
_READY = Operation("Model readiness (verb: metadata)", {"type": "object", "required": ["name", "ready"]}, problems=(404,))
_TOKEN_FORM = {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["grant_type"],
    "properties": {"grant_type": {"type": "string", "enum": ["client_credentials", "password"]},
                   "client_id": {"type": "string"}, "client_secret": {"type": "string"},
                   "username": {"type": "string"}, "password": {"type": "string"}, "totp": {"type": "string"}},
    # Extension parameters are ignored; each may appear once (RFC 6749 section 3.2).
    "additionalProperties": {"type": "string"}}}}}
_DISCOVERY = Operation("Built-in issuer: metadata (RFC 8414)", {"type": "object", "required": ["issuer"]})



def _admin_body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": properties}}}}


ROUTES: tuple[RouteSpec, ...] = (
    # Inference first: the router tries routes in order, and infer is the hot path.
    RouteSpec(MODEL + "/infer", ("POST",), "v2", "infer", _INFER, verb="infer"),
    RouteSpec(VERSIONED + "/infer", ("POST",), "v2", "infer", _INFER, verb="infer"),
    RouteSpec(MODEL + "/explain", ("POST",), "v2", "explain", _EXPLAIN, verb="explain"),
    RouteSpec(VERSIONED + "/explain", ("POST",), "v2", "explain", _EXPLAIN, verb="explain"),
    RouteSpec("/v2/health/live", ("GET",), "v2", "live",
              Operation("Liveness", {"type": "object", "required": ["live"]}), public=True, probe="live"),
    RouteSpec("/v2/health/ready", ("GET",), "v2", "ready",
              Operation("Readiness", {"type": "object", "required": ["ready"]}), public=True, probe="ready"),
    RouteSpec("/v2", ("GET",), "v2", "server_metadata",
              Operation("Server metadata", {"type": "object", "required": ["name", "version", "extensions"]})),
    RouteSpec("/v2/models", ("GET",), "v2", "model_index", Operation(
        "Models this caller may use (verb: list)", {"type": "object", "required": ["models"], "properties": {
            "models": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}), verb="list"),
    RouteSpec("/v2/repository/index", ("POST",), "v2", "repository_index", Operation(
        "Repository index, tritonclient's shape (verb: list)",
        {"type": "array", "items": {"type": "object", "required": ["name", "state"]}}), verb="list"),
    RouteSpec("/admin/models", ("GET",), "v2", "admin_models", Operation(
        "Operator view of the models (verb: admin:models)", {"type": "object", "required": ["models"]}),
        verb="admin:models"),
    RouteSpec("/admin/principals", ("GET",), "incident", "principals", Operation(
        "Model-extraction alarms in force (verb: admin:incident)", {"type": "object", "required": ["alarms"]}),
        verb="admin:incident"),
    RouteSpec("/admin/principals/clear", ("POST",), "incident", "clear_principal", Operation(
        "Clear a principal's extraction alarms (verb: admin:incident)", {"type": "object", "required": ["cleared"]},
        request_body=_admin_body(["principal", "reason"], {
            "principal": {"type": "string"}, "model": {"type": "string"}, "reason": {"type": "string"}})),
        verb="admin:incident"),
    RouteSpec("/admin/incidents", ("GET",), "incident", "status", Operation(
        "Incident controls in force: revocations, quarantine, lockdown (verb: admin:incident)",
        {"type": "object", "required": ["controls"]}), verb="admin:incident"),
    RouteSpec("/admin/incidents/actions", ("POST",), "incident", "act", Operation(
        "Apply an incident control on every replica (verb: admin:incident)", {"type": "object", "required": ["version"]},
        request_body=_admin_body(["action", "reason"], {
            "action": {"type": "string", "enum": list(INCIDENT_ACTIONS)}, "reason": {"type": "string"},
            "jti": {"type": "string"}, "expires_at": {"type": "number"}, "principal": {"type": "string"},
            "sha256": {"type": "string"}, "model": {"type": "string"}, "version": {"type": "string"},
            "break_glass": {"type": "array", "items": {"type": "string"}}})), verb="admin:incident"),
    RouteSpec("/admin/keys/rotate", ("POST",), "incident", "rotate_key", Operation(
        "Rotate the built-in issuer's signing key now (verb: admin:incident)", {"type": "object", "required": ["kid"]},
        request_body=_admin_body(["reason"], {"reason": {"type": "string"}})), verb="admin:incident"),
    RouteSpec(MODEL, ("GET",), "v2", "model_metadata", _META, verb="metadata"),
    RouteSpec(MODEL + "/ready", ("GET",), "v2", "model_ready", _READY, verb="metadata"),
    RouteSpec(VERSIONED, ("GET",), "v2", "model_metadata", _META, verb="metadata"),
    RouteSpec(VERSIONED + "/ready", ("GET",), "v2", "model_ready", _READY, verb="metadata"),
    RouteSpec(TOKEN_PATH, ("POST",), "issuer", "token", Operation(
        "Built-in issuer: token endpoint", {"$ref": "#/components/schemas/Token"}, request_body=_TOKEN_FORM),
        public=True),
    RouteSpec(JWKS_PATH, ("GET",), "issuer", "jwks", Operation(
        "Built-in issuer: public keys", {"type": "object", "required": ["keys"]}, "application/jwk-set+json"),
        public=True),
    RouteSpec("/.well-known/oauth-authorization-server", ("GET",), "issuer", "discovery", _DISCOVERY, public=True),
    RouteSpec("/.well-known/openid-configuration", ("GET",), "issuer", "discovery", _DISCOVERY, public=True),
    RouteSpec("/openapi.json", ("GET",), "ops", "openapi",
              Operation("This document", {"type": "object", "required": ["openapi", "paths"]}), public=True),
    RouteSpec("/metrics", ("GET",), "ops", "metrics",
              Operation("Prometheus metrics (verb: metrics)", {"type": "string"}, "text/plain"), verb="metrics"),
)

PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.public)
"""Paths that take no token (none has a parameter, so the raw path decides)."""
PROBE_PATHS = frozenset(r.path for r in ROUTES if r.probe)
LIVENESS_PATH = next(r.path for r in ROUTES if r.probe == "live")
READINESS_PATH = next(r.path for r in ROUTES if r.probe == "ready")


def starlette_routes(specs: Iterable[RouteSpec], owners: dict[str, object]) -> list[GatewayRoute]:
    """The Starlette routes of ``specs`` whose owner is present (the issuer's only when it is on)."""
    return [GatewayRoute(s, getattr(owners[s.owner], s.handler)) for s in specs if s.owner in owners]
