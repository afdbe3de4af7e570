"""What every stage of the model-aware path shares: the call it works on, and how stages run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.types import Receive

from gateway.catalog import ModelEntry
from gateway.context import RequestContext
from gateway.offload import elements, offload
from gateway_client.protocol.codec import InferRequest, Tensor

__all__ = ["Answer", "InferCall", "Stage", "elements", "offload", "run_stages"]


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    media_type: str
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class InferCall:
    """One inference request as it moves through the stages; each stage fills in its part."""

    ctx: RequestContext
    headers: Headers
    path_params: dict[str, Any]
    receive: Receive
    entry: ModelEntry | None = None
    """The served unit, from ``Resolve``."""
    body: bytes = b""
    """From ``ReadBody``."""
    request: InferRequest | None = None
    """From ``Decode``: the decoded tensors and the requested outputs."""
    inputs: list[Tensor] = field(default_factory=list)
    """From ``CheckSignature``: the inputs in the model's order, checked (clipped where declared)."""
    outputs: list[Tensor] = field(default_factory=list)
    """From ``Infer``; output policies may replace them."""
    riders: list[Tensor] = field(default_factory=list)
    """Extra rows a guard sends with the inputs in the same worker batch (squeezed copies);
    ``Infer`` returns their outputs apart, in ``rider_outputs``, and neither is digested or answered."""
    rider_outputs: list[Tensor] = field(default_factory=list)
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers a stage adds to the answer (a guard's finding)."""
    policy_floor: str | None = None
    """An output policy at least this strict, whatever the caller's roles (an extraction alarm's)."""
    extraction_alarm: bool = False
    """An extraction alarm is in force for the caller on this model (its state is not watched further)."""
    admission: asyncio.Future[None] | None = None
    """From ``ModelLimits`` when it is left running (``[limits] admission = "concurrent"``):
    ``Infer`` waits for it before it uses any output."""
    answer: Answer | None = None
    """From ``Encode``."""
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    """Run when the call ends, however it ends (releasing what a stage claimed)."""

    @property
    def model(self) -> ModelEntry:
        assert self.entry is not None, "a stage that needs the model runs after Resolve"
        return self.entry


class Stage(Protocol):
    """One step of the model-aware path: reads and writes its part of the call, or raises a
    ``GatewayError`` to refuse the request."""

    name: str

    async def __call__(self, call: InferCall) -> None: ...


async def run_stages(stages: Sequence[Stage], call: InferCall) -> None:
    try:
        for stage in stages:
            await stage(call)
    finally:
        for release in reversed(call.cleanup):
            release()
