"""Outlier ejection of worker hosts: an endpoint that fails again before it has served a request
since it returned is held out of rotation for longer each time, whatever its health checks say."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gateway.workers.pool as pool_module
from gateway.config import Config, IssuerConfig, ModelConfig
from gateway.configchecks import remote_worker_problems
from gateway.errors import Unavailable
from gateway.remoteconfig import RemoteWorkersConfig
from gateway.workers.memory import InMemoryTransport
from gateway.workers.pool import WorkerPool
from gateway.workers.transport import WorkerConnectionLost
from gateway_client.protocol.codec import Tensor

INPUTS = [Tensor("x", np.zeros((1, 64), np.float32))]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def pool_with(endpoint: str, monkeypatch: pytest.MonkeyPatch, max_ejection_s: float = 60.0) -> tuple[Any, ...]:
    clock = Clock()
    monkeypatch.setattr(pool_module, "time", clock)
    config = Config(models=(ModelConfig("digits"),), issuer=IssuerConfig(enabled=False),
                    remote_workers=RemoteWorkersConfig(max_ejection_s=max_ejection_s))
    transport = InMemoryTransport(lambda inputs: [np.ones((1, 10), np.float32)], ["probabilities"])
    pool = WorkerPool.of(config, {"digits": [transport]})
    worker = pool.workers["digits"][0]
    worker.endpoint = endpoint
    return pool, worker, transport, clock


async def held_out_for(pool: WorkerPool, worker: Any, clock: Clock) -> float:
    """Fail one request on the worker, then step the clock until a probe brings it back."""
    with pytest.raises(Unavailable):
        await pool.infer("digits", INPUTS)
    assert not worker.healthy
    start = clock.now
    while True:
        await pool._probe_down()
        if worker.healthy:
            return clock.now - start
        clock.now += 0.25


@pytest.mark.anyio
async def test_a_host_that_keeps_failing_is_held_out_longer_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, worker, transport, clock = pool_with("gpu-1.internal:9443", monkeypatch, max_ejection_s=20)
    await worker.probe()
    transport.fail_with = WorkerConnectionLost("garbled answer")
    holds = [await held_out_for(pool, worker, clock) for _ in range(7)]
    assert holds == [0, 1, 2, 4, 8, 16, 20]  # the first returns at the next probe, as a restarted host does
    # One request served ends it: the next failure is a first ejection again.
    transport.fail_with = None
    assert (await pool.infer("digits", INPUTS))[0].array.shape == (1, 10)
    transport.fail_with = WorkerConnectionLost("garbled answer")
    assert await held_out_for(pool, worker, clock) == 0
    assert await held_out_for(pool, worker, clock) == 1


@pytest.mark.anyio
async def test_a_local_worker_is_not_held_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local workers are restarted by the supervisor; their pings say the truth."""
    pool, worker, transport, clock = pool_with("", monkeypatch)
    await worker.probe()
    transport.fail_with = WorkerConnectionLost("worker died")
    assert [await held_out_for(pool, worker, clock) for _ in range(4)] == [0, 0, 0, 0]


@pytest.mark.parametrize("value,refused", [(0.5, True), (3601, True), (1, False), (300, False)])
def test_the_longest_hold_is_checked(value: float, refused: bool) -> None:
    config = Config(models=(ModelConfig("digits", endpoints=("gpu-1.internal:9443",)),),
                    remote_workers=RemoteWorkersConfig(max_ejection_s=value))
    problems = "\n".join(remote_worker_problems(config))
    assert ("remote_workers.max_ejection_s must be 1..3600" in problems) is refused, problems
