"""Resolve the model a request names and authorize the verb on it."""

from __future__ import annotations

from typing import Any

from gateway.access import authorize, principal_of
from gateway.catalog import ModelEntry, ModelTable
from gateway.context import RequestContext
from gateway.errors import ModelQuarantined, NotFound
from gateway.registry.manifest import NAME_PATTERN
from gateway.security.incidents import IncidentStore
from gateway.security.rbac import Policy
from gateway.stages.base import InferCall

__all__ = ["Resolve", "resolve_model"]


def resolve_model(ctx: RequestContext, params: dict[str, Any], models: ModelTable, policy: Policy,
                  verb: str, incidents: IncidentStore | None = None) -> ModelEntry:
    """Authenticate, authorize ``verb`` on the named model, and find the served unit (503 when an
    operator quarantined its version).

    A model that does not exist and one the caller may not see get the same 404, word for word.
    """
    principal_of(ctx)
    name, version = str(params["name"]), params.get("version")
    if not NAME_PATTERN.fullmatch(name):
        raise _unknown("'requested model'", version)
    ctx.model = name
    try:
        authorize(ctx, policy, verb, name)
    except NotFound:
        raise _unknown(repr(name), version) from None
    entry = models.find(name, version)
    if entry is None:
        raise _unknown(repr(name), version)
    ctx.version = entry.manifest.version
    held = incidents.controls.quarantine_of(name, entry.manifest.version) if incidents is not None else None
    if held is not None:
        raise ModelQuarantined(f"{name} version {entry.manifest.version} is quarantined by an operator since "
                               f"{held['time']}", retry_after=60)
    return entry


def _unknown(shown: str, version: object) -> NotFound:
    return NotFound(f"unknown model {shown}" + (f" version {str(version)[:64]!r}" if version else ""))


class Resolve:
    name = "resolve"

    def __init__(self, models: ModelTable, policy: Policy, verb: str = "infer",
                 incidents: IncidentStore | None = None) -> None:
        self.models = models
        self.policy = policy
        self.verb = verb
        self.incidents = incidents

    async def __call__(self, call: InferCall) -> None:
        call.entry = resolve_model(call.ctx, call.path_params, self.models, self.policy, self.verb, self.incidents)
