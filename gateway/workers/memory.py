"""A worker transport that runs a function in this process: for fast tests of the request path.

No process, no socket: ``InMemoryTransport(run, ["probabilities"])`` answers each inference with
``run({input name: array})``, and can be told to fail as a worker would (``fail_with``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gateway.workers.transport import WorkerTransport
from gateway_client.protocol.codec import Tensor

__all__ = ["InMemoryTransport"]

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class InMemoryTransport(WorkerTransport):
    def __init__(self, run: RunFn, output_names: list[str], address: str = "memory") -> None:
        self.run = run
        self.output_names = output_names
        self.address = address
        self.calls: list[dict[str, np.ndarray]] = []
        self.fail_with: BaseException | None = None
        """Raised by the next inferences instead of running (a dead worker: ``WorkerConnectionLost``)."""

    async def infer(self, inputs: list[Tensor], timeout: float, limit: int | None = None) -> list[Tensor]:
        if self.fail_with is not None:
            raise self.fail_with
        arrays = {t.name: t.array for t in inputs}
        self.calls.append(arrays)
        return [Tensor(n, np.asarray(a)) for n, a in zip(self.output_names, self.run(arrays))]

    async def health(self, timeout: float) -> dict[str, Any] | None:
        return {"ready": True, "providers": ["InMemory"], "queue_depth": 0}
