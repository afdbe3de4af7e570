"""One route table: every route the app serves is in /openapi.json and nothing else is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.config import load_config
from gateway.routes import PUBLIC_PATHS, ROUTES, GatewayRoute


def _app(pki: Path, tmp_path: Path, issuer: bool) -> tuple[set[tuple[str, str]], dict[str, object]]:
    config = load_config(pki / "gateway.toml")
    config = dataclasses.replace(config, audit=dataclasses.replace(config.audit, enabled=False),
                                 issuer=dataclasses.replace(config.issuer, enabled=issuer))
    if not issuer:
        trust = dataclasses.replace(config.auth, issuers=(), require_token=False)
        config = dataclasses.replace(config, auth=trust)
    app = create_app(config, str(tmp_path))
    served = {(r.spec.document_path, m) for r in app.routes if isinstance(r, GatewayRoute) for m in r.spec.methods}
    assert len(served) == sum(len(r.methods or ()) - ("HEAD" in (r.methods or ())) for r in app.routes)  # type: ignore[attr-defined]
    return served, app  # type: ignore[return-value]


@pytest.mark.anyio
@pytest.mark.parametrize("issuer", [True, False], ids=["issuer-on", "issuer-off"])
async def test_served_routes_and_the_openapi_document_agree(pki: Path, tmp_path: Path, issuer: bool) -> None:
    served, app = _app(pki, tmp_path, issuer)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="https://gw") as c:  # type: ignore[arg-type]
        doc = (await c.get("/openapi.json")).json()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops
                  if method != "parameters"}
    assert served == documented
    assert ("/oauth/token", "POST") in served if issuer else ("/oauth/token", "POST") not in served
    for path, ops in doc["paths"].items():  # public routes say so; the others ask for a token
        for method, op in ops.items():
            if method != "parameters":
                assert (op.get("security") == []) == (path in PUBLIC_PATHS), (path, method)


def test_the_table_names_each_handler_that_exists() -> None:
    from gateway.endpoints import V2, IssuerEndpoints, OpsEndpoints
    from gateway.endpoints.incident import IncidentEndpoints

    owners = {"v2": V2, "issuer": IssuerEndpoints, "ops": OpsEndpoints, "incident": IncidentEndpoints}
    for spec in ROUTES:
        assert callable(getattr(owners[spec.owner], spec.handler, None)), spec
