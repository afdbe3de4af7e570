"""The gateway's own OpenAPI 3.1 document, served at ``/openapi.json``.

Written out rather than derived from the routes: it states what each route accepts and every
status it can answer (each refusal a problem document), and the test suite holds the running
gateway to it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.protocol.datatypes import DATATYPES
from gateway.registry.manifest import NAME_PATTERN

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
            "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}


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


def openapi_document() -> dict[str, Any]:
    model = {"parameters": [_name_param("name", "digits")]}
    versioned = {"parameters": [_name_param("name", "digits"), _name_param("version", "1")]}
    infer_body = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    }

    def op(summary: str, ok: dict[str, Any], *codes: int, public: bool = False, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": summary, "responses": {**ok, **_problems(*codes)}, **extra}
        if public:
            out["security"] = []
        return out

    meta = op("Model metadata (verb: metadata)", _ok({"$ref": "#/components/schemas/ModelMetadata"}), 404)
    ready = op("Model readiness (verb: metadata)", _ok({"type": "object", "required": ["name", "ready"]}), 404)
    infer = op("Inference (verb: infer)", _ok({"$ref": "#/components/schemas/InferResponse"}), 404, 422, 499, 504,
               requestBody=infer_body)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Secure model-serving gateway", "version": __version__,
                 "description": "Open Inference Protocol v2 (REST) behind mTLS, bearer tokens and RBAC."},
        "security": [{"bearer": []}],
        "paths": {
            "/v2/health/live": {"get": op("Liveness", _ok({"type": "object", "required": ["live"]}), public=True)},
            "/v2/health/ready": {"get": op("Readiness", _ok({"type": "object", "required": ["ready"]}), public=True)},
            "/v2": {"get": op("Server metadata", _ok({"type": "object", "required": ["name", "version", "extensions"]}))},
            "/v2/models": {"get": op("Models this caller may use (verb: list)", _ok({
                "type": "object", "required": ["models"],
                "properties": {"models": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}))},
            "/v2/repository/index": {"post": op("Repository index, tritonclient's shape (verb: list)", _ok(
                {"type": "array", "items": {"type": "object", "required": ["name", "state"]}}))},
            "/v2/models/{name}": {**model, "get": meta},
            "/v2/models/{name}/versions/{version}": {**versioned, "get": meta},
            "/v2/models/{name}/ready": {**model, "get": ready},
            "/v2/models/{name}/versions/{version}/ready": {**versioned, "get": ready},
            "/v2/models/{name}/infer": {**model, "post": infer},
            "/v2/models/{name}/versions/{version}/infer": {**versioned, "post": infer},
            "/admin/models": {"get": op("Operator view of the models (verb: admin:models)", _ok(
                {"type": "object", "required": ["models"]}))},
            "/oauth/token": {"post": op(
                "Built-in issuer: token endpoint", _ok({"$ref": "#/components/schemas/Token"}), public=True,
                requestBody={"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                    "type": "object", "required": ["grant_type"],
                    "properties": {"grant_type": {"type": "string", "enum": ["client_credentials", "password"]},
                                   "client_id": {"type": "string"}, "client_secret": {"type": "string"},
                                   "username": {"type": "string"}, "password": {"type": "string"},
                                   "totp": {"type": "string"}},
                    # Extension parameters are ignored; each may appear once (RFC 6749 section 3.2).
                    "additionalProperties": {"type": "string"}}}}})},
            "/oauth/jwks": {"get": op("Built-in issuer: public keys", _ok({"type": "object", "required": ["keys"]},
                                                                           "application/jwk-set+json"), public=True)},
            "/.well-known/openid-configuration": {"get": op(
                "Built-in issuer: metadata", _ok({"type": "object", "required": ["issuer", "jwks_uri"]}), public=True)},
            "/.well-known/oauth-authorization-server": {"get": op(
                "Built-in issuer: metadata (RFC 8414)", _ok({"type": "object", "required": ["issuer"]}), public=True)},
            "/openapi.json": {"get": op("This document", _ok({"type": "object"}), public=True)},
        },
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
