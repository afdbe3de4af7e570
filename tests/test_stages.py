"""The model-aware stage list, run in this process over an in-memory worker: no process, no socket.

Each test assembles the list as the gateway does (``gateway.app.infer_stages``), with guards and
output policies in their positions, and checks what each stage left in the call and the context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from starlette.datastructures import Headers
from starlette.types import Receive

from gateway.app import infer_stages
from gateway.catalog import ModelTable
from gateway.config import Config, IssuerConfig, LimitsConfig, ModelConfig, PolicyConfig, RuleConfig
from gateway.context import Finding, RequestContext
from gateway.errors import GatewayError, TooManyRequests, Unavailable
from gateway.registry.manifest import load_manifest
from gateway.security.ratelimit import Limiter
from gateway.security.rbac import Policy
from gateway.security.types import Principal
from gateway.stages import Decoder, InferCall, InFlightBytes, Stage, run_stages
from gateway.units import Unit
from gateway.workers.memory import InMemoryTransport
from gateway.workers.pool import WorkerPool
from gateway.workers.transport import WorkerConnectionLost
from gateway_client.protocol.codec import Tensor

DEMO = Principal("demo", "service", frozenset({"inference"}), issuer="https://gw")
CONFIG = Config(
    models=(ModelConfig("digits"),),
    issuer=IssuerConfig(enabled=False),
    rbac=PolicyConfig(rules=(RuleConfig("inference", ("inference",), ("infer",)),)),
    limits=LimitsConfig(budget_inferences="3/day"),
)


def probabilities(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = inputs["input"]
    scores = np.stack([x[:, :10].sum(axis=1) * (k + 1) for k in range(10)], axis=1)
    return [(scores / scores.sum(axis=1, keepdims=True)).astype(np.float32)]


class Suspicious(GatewayError):
    status = 422
    type = "suspicious-input"
    title = "Input refused by a guard"


class RefuseAllZeros:
    """A guard that refuses: an all-zero image is no digit."""

    name = "zeros-guard"

    async def __call__(self, call: InferCall) -> None:
        if not any(t.array.any() for t in call.inputs):
            call.ctx.findings.append(Finding(self.name, "blank-input", "every pixel is 0", action="refuse"))
            raise Suspicious("the input is blank")


class RecordBrightness:
    """A guard that only records."""

    name = "brightness-guard"

    async def __call__(self, call: InferCall) -> None:
        mean = float(np.mean([t.array.mean() for t in call.inputs]))
        call.ctx.findings.append(Finding(self.name, "brightness", f"mean pixel {mean:.2f}", score=mean))


class LabelOnly:
    """An output policy: the winning class instead of the probabilities."""

    name = "label-only"

    async def __call__(self, call: InferCall) -> None:
        call.outputs = [Tensor("label", np.argmax(t.array, axis=1).astype(np.int64)) for t in call.outputs]


@pytest.fixture
def worker() -> InMemoryTransport:
    return InMemoryTransport(probabilities, ["probabilities"])


@pytest.fixture
def in_flight() -> InFlightBytes:
    return InFlightBytes(total=1 << 20, per_principal=1 << 16)


@pytest.fixture
def build(models_root: Path, worker: InMemoryTransport, in_flight: InFlightBytes) -> Iterator[Any]:
    decoder = Decoder(CONFIG.server)

    def stages(guards: list[Stage] | None = None, outputs: list[Stage] | None = None) -> list[Stage]:
        models = ModelTable(CONFIG, {Unit("digits"): load_manifest(models_root / "digits" / "1")})
        pool = WorkerPool.of(CONFIG, {"digits": [worker]})
        for client in pool.workers["digits"]:
            client.healthy = True
        return infer_stages(CONFIG, models, Policy(CONFIG.rbac), Limiter(CONFIG.limits), pool, decoder, in_flight,
                            guards or [], [], outputs or [])

    yield stages
    decoder.close()


def receive_once(body: bytes) -> Receive:
    """An ASGI ``receive`` that delivers ``body`` in one message, then a disconnect."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def call_with(pixels: float) -> InferCall:
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [pixels] * 64}]})
    receive = receive_once(body)

    now = time.monotonic()
    ctx = RequestContext("r1", now, now + 5, "127.0.0.1", None, principal=DEMO)
    return InferCall(ctx, Headers({"content-type": "application/json", "content-length": str(len(body))}),
                     {"name": "digits"}, receive)


@pytest.mark.anyio
async def test_the_stages_answer_with_the_workers_outputs_and_fill_the_context(build: Any, worker: InMemoryTransport,
                                                                               in_flight: InFlightBytes) -> None:
    call = call_with(8.0)
    await run_stages(build(), call)
    assert call.answer is not None and call.answer.media_type == "application/json"
    out = orjson.loads(call.answer.body)["outputs"][0]
    expected = probabilities({"input": np.full((1, 64), 8.0, np.float32)})[0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(1, 10), expected, rtol=1e-6)
    ctx = call.ctx
    assert (ctx.model, ctx.version, ctx.worker) == ("digits", "1", "digits-0")
    assert ctx.decision is not None and ctx.decision.rule == "inference"
    assert [d.shape for d in ctx.inputs] == [(1, 64)] and [d.name for d in ctx.outputs] == ["probabilities"]
    assert len(worker.calls) == 1
    assert in_flight.total == 0, "the body's bytes are released when the call ends"


@pytest.mark.anyio
async def test_a_refusing_guard_stops_the_request_before_the_worker_and_the_budget(build: Any,
                                                                                  worker: InMemoryTransport) -> None:
    stages = build(guards=[RefuseAllZeros()])
    for _ in range(5):  # the budget (3 a day) counts only requests that got past the guards
        call = call_with(0.0)
        with pytest.raises(Suspicious):
            await run_stages(stages, call)
        assert [f.action for f in call.ctx.findings] == ["refuse"]
    assert worker.calls == []
    await run_stages(stages, call_with(8.0))  # a good one still passes
    assert len(worker.calls) == 1


@pytest.mark.anyio
async def test_a_recording_guard_notes_its_finding_and_lets_the_request_through(build: Any) -> None:
    call = call_with(4.0)
    await run_stages(build(guards=[RecordBrightness(), RefuseAllZeros()]), call)
    assert call.answer is not None
    assert [(f.stage, f.action, f.score) for f in call.ctx.findings] == [("brightness-guard", "record", 4.0)]


@pytest.mark.anyio
async def test_an_output_policy_changes_what_the_client_sees_not_what_the_worker_ran(build: Any) -> None:
    call = call_with(8.0)
    await run_stages(build(outputs=[LabelOnly()]), call)
    assert call.answer is not None
    outputs = orjson.loads(call.answer.body)["outputs"]
    assert [(o["name"], o["datatype"], o["data"]) for o in outputs] == [("label", "INT64", [9])]
    assert [d.name for d in call.ctx.outputs] == ["probabilities"], "the audit record keeps what the model said"


@pytest.mark.anyio
async def test_the_budget_and_a_dead_worker_refuse_as_documented(build: Any, worker: InMemoryTransport) -> None:
    stages = build()
    for _ in range(3):
        await run_stages(stages, call_with(8.0))
    with pytest.raises(TooManyRequests):
        await run_stages(stages, call_with(8.0))
    worker.fail_with = WorkerConnectionLost("killed")
    stages = build()  # a fresh budget, the same dead worker
    with pytest.raises(Unavailable):
        await run_stages(stages, call_with(8.0))


@pytest.mark.anyio
async def test_bodies_in_flight_are_bounded_per_principal(build: Any, in_flight: InFlightBytes) -> None:
    in_flight.claim(DEMO.key, (1 << 16) - 100)  # this principal's other uploads, still being read
    call = call_with(8.0)
    with pytest.raises(TooManyRequests, match="in flight"):
        await run_stages(build(), call)
    assert in_flight.total == (1 << 16) - 100, "a refused call holds nothing"
