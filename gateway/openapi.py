"""The gateway's own OpenAPI 3.1 document, served at ``/openapi.json``.

Derived from the route table (``gateway.routes``): each entry's ``Operation`` states what the route
accepts and every status it can answer (each refusal a problem document). The test suite holds the
running gateway to it with schemathesis, and checks that every served route is documented.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway import __version__
from gateway.registry.manifest import NAME_PATTERN
from gateway.routes import RouteSpec
from gateway_client.protocol.datatypes import DATATYPES

__all__ = ["openapi_document"]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_TEXT = {
    400: "Malformed request", 401: "No or an invalid bearer token, or a step-up is needed",
    403: "The policy does not grant this", 404: "No such model (or not one this caller may use)",
    405: "Method not allowed", 408: "The request arrived too slowly", 413: "Body too large",
    415: "Unsupported content encoding or type", 422: "Input does not match the model's signature",
    429: "Rate limit or budget exceeded", 431: "Headers too large", 499: "The client went away",
    500: "Internal error", 503: "No healthy worker, or a dependency is unavailable", 504: "Deadline exceeded",
}
_COMMON = (400, 401, 403, 405, 408, 413, 415, 429, 431, 500, 503)


def _problems(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _TEXT[c], "content": {"application/problem+json": {"schema": _PROBLEM}}}
            for c in sorted(set(codes) | set(_COMMON))}


def _ok(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": "OK", "content": {media: {"schema": schema}}}}


def _name_param(name: str, example: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "example": example,
            "schema": {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"}}


def _tensor(data_required: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "datatype": {"type": "string", "enum": sorted(DATATYPES)},
            "shape": {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": 0}},
            "parameters": {"type": "object", "additionalProperties": False,
                           "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
            "data": {"type": "array"},
        },
        "additionalProperties": False,
    }
    if data_required:
        schema["required"] = [*schema["required"], "data"]
    return schema


def _operation(spec: RouteSpec) -> dict[str, Any]:
    doc = spec.doc
    out: dict[str, Any] = {"summary": doc.summary, "responses": {**_ok(doc.ok, doc.media), **_problems(*doc.problems)}}
    if doc.request_body is not None:
        out["requestBody"] = doc.request_body
    if spec.public:
        out["security"] = []
    return out


def _parameters(spec: RouteSpec) -> list[dict[str, Any]]:
    names = [part[1:].split(":")[0].rstrip("}") for part in spec.path.split("/") if part.startswith("{")]
    return [_name_param(n, "digits" if n == "name" else "1") for n in names]


def openapi_document(specs: Iterable[RouteSpec]) -> dict[str, Any]:
    """The document for the routes being served (the table's entries whose owner is present)."""
    paths: dict[str, Any] = {}
    for spec in specs:
        entry = paths.setdefault(spec.document_path, {})
        if params := _parameters(spec):
            entry["parameters"] = params
        for method in spec.methods:
            entry[method.lower()] = _operation(spec)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Secure model-serving gateway", "version": __version__,
                 "description": "Open Inference Protocol v2 (REST) behind mTLS, bearer tokens and RBAC."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Problem": {
                    "type": "object", "required": ["type", "title", "status", "detail"],
                    "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                   "status": {"type": "integer"}, "detail": {"type": "string"},
                                   "instance": {"type": "string"}, "request_id": {"type": "string"},
                                   "error": {"type": "string"}},
                },
                "InferRequest": {
                    "type": "object", "required": ["inputs"], "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string", "maxLength": 256},
                        "parameters": {"type": "object", "additionalProperties": False,
                                       "properties": {"binary_data_output": {"type": "boolean"}}},
                        "inputs": {"type": "array", "minItems": 1, "maxItems": 64, "items": _tensor(True)},
                        "outputs": {"type": "array", "items": {
                            "type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "parameters": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"binary_data": {"type": "boolean"}}}}}},
                    },
                },
                "InferResponse": {
                    "type": "object", "required": ["model_name", "outputs"],
                    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                   "id": {"type": "string"}, "outputs": {"type": "array", "items": _tensor(False)}},
                },
                "ModelMetadata": {
                    "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                    "properties": {"name": {"type": "string"}, "versions": {"type": "array"},
                                   "platform": {"type": "string"}, "inputs": {"type": "array"},
                                   "outputs": {"type": "array"}},
                },
                "Token": {
                    "type": "object", "required": ["access_token", "token_type", "expires_in"],
                    "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string"},
                                   "expires_in": {"type": "integer"}},
                },
            },
        },
    }
