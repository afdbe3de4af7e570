"""Dynamic batching: concurrent requests for one model share a single ``session.run``.

Requests queue here; one loop takes what is waiting (up to ``max_batch_size`` rows), joins the
inputs along the batch axis, runs them in the session's thread (or inline, when runs take only
microseconds) and splits the outputs back.
Batches form naturally while the previous ``run`` is executing; when the last batch held more
than one request (the model is under concurrent load), the loop also waits up to
``max_queue_delay`` for the batch to fill, as Triton's dynamic batcher does. A lone client
therefore pays no queueing delay; and while the batcher is ``quiet`` a request that arrives alone
is run in the turn that brought it (``run_now``), which spares it the queue and two task switches
(a quarter to a third of a ``digits`` worker's CPU per request at one client).

With ``buckets`` (on CUDA by default: the maximum batch size alone), a batch is padded to the
next bucket size and the padding sliced off the outputs. ONNX Runtime's CUDA kernels redo their
set-up whenever the input shape changes, and do not keep it per shape: on an H200
(``bench/gpu_batch_probe.py``) ``resnetish`` ran a batch of 16 in 3.7 ms when every batch had
that size, but 37 ms per run when batches alternated between 16 and 8 (or 13), and 57 to 90 ms
for the first run of each new size. One shape costs a lone request a padded batch (3.8 ms
instead of 1.5 ms there); list smaller sizes in ``batch_buckets`` to trade differently.

A batch never mixes requests' answers or errors: if a joined run fails, each request runs again
alone, so only the one that caused the error gets it; if a batch's outputs do not have one row per
input row (a model that reshapes across rows, or answers detections of any number), its requests
run again alone and the batcher stops joining requests for good.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BatchStats", "Batcher", "DeadlineExceeded"]

log = logging.getLogger("gateway.worker")

# A run this short costs less than handing it to the session thread and back (~40 us): run it
# on the event loop itself. ``digits`` runs in ~10 us; ``resnetish`` (~18 ms) always uses the thread.
INLINE_BELOW_S = 0.0002

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the request's batch ran."""


@dataclass(slots=True)
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[object, ...]
    future: asyncio.Future[list[np.ndarray]]
    queued_at: float
    expires: float = math.inf
    """``time.monotonic()`` past which its caller no longer waits: it is dropped, not run."""


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    requests: int = 0
    sizes: dict[int, int] = field(default_factory=dict)
    """Batches by the number of requests joined in them."""
    queue_seconds: float = 0.0
    """Summed over requests: from arrival to the start of its batch's run."""
    compute_seconds: float = 0.0
    """Summed over requests: its batch's run (each request of a batch counts the whole run)."""
    expired: int = 0
    """Requests dropped because their deadline passed while they queued."""
    immediate: int = 0
    """Requests run at once as they arrived, alone, without queueing (``Batcher.run_now``)."""
    unbatchable: bool = False
    """A batch's outputs did not follow its inputs row for row: requests run alone since."""

    def record(self, requests: int) -> None:
        self.batches += 1
        self.requests += requests
        self.sizes[requests] = self.sizes.get(requests, 0) + 1


class Batcher:
    def __init__(
        self,
        run: RunFn,
        *,
        batchable: bool,
        max_batch_size: int,
        max_queue_delay_s: float,
        buckets: tuple[int, ...] = (),
    ) -> None:
        self._run = run
        self._buckets = sorted(buckets) if batchable else []
        self._batchable = batchable
        self._max_rows = max_batch_size if batchable else 1
        self._delay = max_queue_delay_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session")
        self._task: asyncio.Task[None] | None = None
        self._last_batch = 1
        self._run_time_s = float("inf")  # a moving average; the first run goes to the thread
        self.stats = BatchStats()

    @property
    def buckets(self) -> list[int]:
        return list(self._buckets)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: dict[str, np.ndarray], expires: float = math.inf) -> list[np.ndarray]:
        """The outputs of ``inputs``, run in a batch; ``DeadlineExceeded`` when ``expires`` (a
        ``time.monotonic()``) passes before its batch runs."""
        # Only tensors that agree on everything but the batch dimension can be joined.
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items()))
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(inputs, self._rows(inputs), key, future, time.monotonic(), expires))
        return await future

    @property
    def quiet(self) -> bool:
        """Nothing is queued, the last batch held one request and runs take microseconds: a request
        arriving now would run alone, at once, on the event loop. ``run_now`` does just that."""
        return (self._run_time_s < INLINE_BELOW_S and self._last_batch == 1 and self._queue.empty()
                and self._task is not None and not self._task.done())

    def run_now(self, inputs: dict[str, np.ndarray], expires: float = math.inf) -> list[np.ndarray]:
        """What ``submit`` returns while the batcher is ``quiet``, in the caller's own turn of the
        event loop: the same run (padded to a bucket as a batch would be), the same statistics,
        without the queue and the two task switches. ``DeadlineExceeded`` as from ``submit``."""
        assert self.quiet, "run_now is for a request that would run alone at once"
        started = time.monotonic()
        if expires <= started:
            self.stats.expired += 1
            raise DeadlineExceeded("the request's deadline passed before its batch ran")
        rows = self._rows(inputs)
        pad = self._pad(rows)
        self.stats.record(1)
        self.stats.immediate += 1
        try:
            outputs = self._timed_run({n: _join([a], pad) for n, a in inputs.items()} if pad else inputs)
            if pad and not _aligned(outputs, rows + pad):
                log.error("a padded run came back with outputs of %s rows: this model cannot be batched; from now "
                          "on each request runs alone", [o.shape[:1] for o in outputs])
                self._stop_batching()
                return self._timed_run(inputs)
        finally:
            self.stats.compute_seconds += time.monotonic() - started
        return [o[:rows] for o in outputs] if pad else outputs

    def _rows(self, inputs: dict[str, np.ndarray]) -> int:
        first = next(iter(inputs.values()))
        return int(first.shape[0]) if self._batchable and first.ndim else 1

    def _pad(self, rows: int) -> int:
        """Rows of padding up to the next bucket (none without buckets, or past the largest)."""
        return next((b for b in self._buckets if b >= rows), rows) - rows

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        rows = batch[0].rows
        deadline = time.monotonic() + (self._delay if self._last_batch > 1 else 0.0)
        while rows < self._max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            batch.append(item)
            rows += item.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._last_batch = len(batch)
            groups: dict[tuple[object, ...], list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for items in groups.values():
                await self._execute(loop, items)

    async def _run_in(self, loop: asyncio.AbstractEventLoop, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One run: on the event loop when runs take microseconds, else in the session's thread."""
        if self._run_time_s < INLINE_BELOW_S:
            return self._timed_run(inputs)
        return await loop.run_in_executor(self._executor, self._timed_run, inputs)

    async def _each_alone(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        """Each request's own run, unpadded: its own outputs, or its own error."""
        for item in items:
            try:
                outputs = await self._run_in(loop, item.inputs)
            except Exception as exc:
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            if not item.future.done():
                item.future.set_result(outputs)

    def _stop_batching(self) -> None:
        self._batchable, self._max_rows, self._buckets = False, 1, []
        self.stats.unbatchable = True

    def _timed_run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The run itself, timed where it executes (the hand-off to the thread is not counted)."""
        started = time.perf_counter()
        try:
            return self._run(inputs)
        finally:
            elapsed = time.perf_counter() - started
            first = self._run_time_s == float("inf")
            self._run_time_s = elapsed if first else 0.8 * self._run_time_s + 0.2 * elapsed

    async def _execute(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        now = time.monotonic()
        for item in items:
            if item.expires <= now and not item.future.done():  # nobody waits for it: not worth a run
                item.future.set_exception(DeadlineExceeded("the request's deadline passed before its batch ran"))
                self.stats.expired += 1
        live = [i for i in items if not i.future.done()]
        if not live:
            return
        rows = sum(i.rows for i in live)
        pad = self._pad(rows)
        if len(live) == 1 and not pad:
            joined = live[0].inputs
        else:
            joined = {n: _join([i.inputs[n] for i in live], pad) for n in live[0].inputs}
        self.stats.record(len(live))
        started = time.monotonic()
        self.stats.queue_seconds += sum(started - i.queued_at for i in live)
        try:
            outputs = await self._run_in(loop, joined)
        except Exception as exc:
            if len(live) > 1:  # whose was it? Each alone: only that request fails
                await self._each_alone(loop, live)
                return
            if not live[0].future.done():  # its caller may have gone meanwhile
                live[0].future.set_exception(exc)
            return
        finally:
            self.stats.compute_seconds += (time.monotonic() - started) * len(live)
        if (len(live) > 1 or pad) and not _aligned(outputs, rows + pad):
            # The model's outputs do not follow its inputs row for row (a reshape, detections of
            # any number): splitting them would hand one request's rows to another.
            log.error("a batch of %d rows came back with outputs of %s rows: this model cannot be batched; "
                      "from now on each request runs alone", rows + pad, [o.shape[:1] for o in outputs])
            self._stop_batching()
            await self._each_alone(loop, live)
            return
        if pad:
            outputs = [o[:rows] for o in outputs]
        offsets = np.cumsum([i.rows for i in live])[:-1]
        parts = [np.split(o, offsets) if len(live) > 1 else [o] for o in outputs]
        for k, item in enumerate(live):
            if not item.future.done():
                item.future.set_result([p[k] for p in parts])


def _aligned(outputs: list[np.ndarray], rows: int) -> bool:
    """Every output has one row per input row, as a batch's outputs must to be split again."""
    return all(o.ndim and o.shape[0] == rows for o in outputs)


def _join(arrays: list[np.ndarray], pad: int) -> np.ndarray:
    """Concatenate along the batch axis, then repeat the last row ``pad`` times."""
    if pad:
        arrays = [*arrays, np.repeat(arrays[-1][-1:], pad, axis=0)]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
