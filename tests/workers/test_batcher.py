"""Dynamic batching: concurrent requests share one run, each gets its own rows back."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from gateway.workers.batcher import Batcher
from tests.conftest import Gateway


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.gate = threading.Event()

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.gate.wait(5)
        x = inputs["x"]
        self.calls.append(x.shape[0])
        if self.fail:
            raise RuntimeError("boom")
        return [x * 2, x.sum(axis=1, keepdims=True)]

    async def submit_while_held(self, b: Batcher, xs: list[np.ndarray]) -> list[object]:
        """Queue every input while the first run is held, so the rest must batch; then release."""
        tasks = [asyncio.ensure_future(b.submit({"x": x})) for x in xs]
        await asyncio.sleep(0.01)
        self.gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))


@pytest.mark.anyio
async def test_concurrent_requests_share_runs_and_get_their_own_rows() -> None:
    rec = Recorder()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.005)
    b.start()
    xs = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(40)]
    results = await rec.submit_while_held(b, xs)
    for x, (doubled, sums) in zip(xs, results):
        np.testing.assert_array_equal(doubled, x * 2)
        np.testing.assert_array_equal(sums, x.sum(axis=1, keepdims=True))
    assert sum(rec.calls) == sum(x.shape[0] for x in xs)
    assert len(rec.calls) < len(xs) and max(rec.calls) <= 8 + 2  # one request may overshoot by its own rows
    await b.stop()


@pytest.mark.anyio
async def test_incompatible_shapes_are_run_separately() -> None:
    rec = Recorder()
    rec.gate.set()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0)
    b.start()
    a, c = np.ones((1, 4), np.float32), np.ones((1, 5), np.float32)
    ra, rc = await asyncio.gather(b.submit({"x": a}), b.submit({"x": c}))
    assert ra[0].shape == (1, 4) and rc[0].shape == (1, 5)
    await b.stop()


@pytest.mark.anyio
async def test_a_run_that_fails_for_every_request_fails_each() -> None:
    rec = Recorder(fail=True)
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0)
    b.start()
    results = await rec.submit_while_held(b, [np.ones((1, 2), np.float32)] * 3)
    assert all(isinstance(r, RuntimeError) for r in results)
    await b.stop()


@pytest.mark.anyio
async def test_a_failed_batch_fails_only_the_request_that_fails_alone() -> None:
    """One request that makes the model fail must not fail the others it was batched with (nor
    hand them its error)."""
    calls: list[int] = []
    gate = threading.Event()

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        gate.wait(5)
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise RuntimeError("index out of range")
        return [inputs["x"] * 2]

    b = Batcher(run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0)
    b.start()
    xs = [np.full((1, 2), 1.0, np.float32), np.full((1, 2), -1.0, np.float32), np.full((2, 2), 3.0, np.float32)]
    tasks = [asyncio.ensure_future(b.submit({"x": x})) for x in xs]
    await asyncio.sleep(0.01)
    gate.set()
    good, bad, other = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(bad, RuntimeError)
    np.testing.assert_array_equal(good[0], xs[0] * 2)  # type: ignore[index]
    np.testing.assert_array_equal(other[0], xs[2] * 2)  # type: ignore[index]
    assert calls == [4, 1, 1, 2]  # the batch of three requests, then each of them alone
    await b.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("buckets", [(), (4,)], ids=["batched", "padded"])
async def test_outputs_that_do_not_follow_the_rows_stop_batching(buckets: tuple[int, ...]) -> None:
    """A model that reshapes across rows (or answers any number of detections): split by rows, one
    request's outputs would reach another. Each runs again alone, and no batch forms again."""
    calls: list[int] = []
    gate = threading.Event()

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        gate.wait(5)
        calls.append(len(inputs["x"]))
        return [inputs["x"].reshape(-1, 2)]  # two output rows per input row

    b = Batcher(run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0, buckets=buckets)
    b.start()
    xs = [np.full((1, 4), float(i), np.float32) for i in range(3)]
    tasks = [asyncio.ensure_future(b.submit({"x": x})) for x in xs]
    await asyncio.sleep(0.01)
    gate.set()
    for x, (y,) in zip(xs, await asyncio.gather(*tasks)):
        np.testing.assert_array_equal(y, x.reshape(-1, 2))
    assert b.stats.unbatchable and b.buckets == []
    calls.clear()
    later = await asyncio.gather(*(b.submit({"x": x}) for x in xs))
    assert calls == [1, 1, 1] and [y.tolist() for (y,) in later] == [x.reshape(-1, 2).tolist() for x in xs]
    await b.stop()


@pytest.mark.anyio
async def test_unbatchable_models_run_one_request_at_a_time() -> None:
    rec = Recorder()
    rec.gate.set()
    b = Batcher(rec.run, batchable=False, max_batch_size=8, max_queue_delay_s=0.0)
    b.start()
    await asyncio.gather(*(b.submit({"x": np.ones((2, 2), np.float32)}) for _ in range(5)))
    assert rec.calls == [2] * 5
    await b.stop()


@pytest.mark.anyio
async def test_batches_are_padded_to_buckets_and_padding_never_returned() -> None:
    rec = Recorder()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0, buckets=(1, 2, 4, 8))
    b.start()
    xs = [np.full((1, 4), float(i), np.float32) for i in range(3)]
    results = await rec.submit_while_held(b, xs)
    assert rec.calls == [4]  # three rows ran as a bucket of four
    for x, (doubled, sums) in zip(xs, results):
        np.testing.assert_array_equal(doubled, x * 2)
        assert sums.shape == (1, 1)
    await b.stop()


@pytest.mark.parametrize("setting,providers,expected", [
    ("auto", ["CPUExecutionProvider"], ()),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"], (24,)),
    ("off", ["CUDAExecutionProvider"], ()),
    ("16,4", ["CPUExecutionProvider"], (4, 16)),
])
def test_bucket_settings(setting: str, providers: list[str], expected: tuple[int, ...]) -> None:
    from gateway.workers.worker import batch_buckets

    assert batch_buckets(setting, 24, providers) == expected


@pytest.mark.anyio
async def test_microsecond_runs_stay_on_the_loop_and_slow_runs_use_the_session_thread() -> None:
    import threading
    import time

    where: list[str] = []
    delay = {"s": 0.0}

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        where.append(threading.current_thread().name)
        time.sleep(delay["s"])
        return [inputs["x"]]

    b = Batcher(run, batchable=True, max_batch_size=4, max_queue_delay_s=0.0)
    b.start()
    loop_thread = threading.current_thread().name
    await b.submit({"x": np.ones((1, 2), np.float32)})
    assert where[0].startswith("session")  # unknown cost: the first run is off the loop
    for _ in range(50):  # a busy machine can make a few fast runs look slow; the average settles
        await b.submit({"x": np.ones((1, 2), np.float32)})
        if where[-1] == loop_thread:
            break
    assert where[-1] == loop_thread
    delay["s"] = 0.01  # the model got slow: the moving average sends runs back to the thread
    for _ in range(20):
        await b.submit({"x": np.ones((1, 2), np.float32)})
        if where[-1].startswith("session"):
            break
    assert where[-1].startswith("session")
    await b.stop()


@pytest.mark.anyio
async def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_not_run() -> None:
    import time

    from gateway.workers.batcher import DeadlineExceeded

    rec = Recorder()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0)
    b.start()
    held = asyncio.ensure_future(b.submit({"x": np.ones((1, 4), np.float32)}))  # its run waits for the gate
    await asyncio.sleep(0.02)
    late = asyncio.ensure_future(b.submit({"x": np.ones((3, 4), np.float32)}, time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
    rec.gate.set()
    assert (await held)[0].shape == (1, 4)
    with pytest.raises(DeadlineExceeded):
        await late
    assert rec.calls == [1] and b.stats.expired == 1  # the late one never ran
    await b.stop()


@pytest.mark.anyio
async def test_a_worker_drops_a_request_whose_deadline_has_passed(gateway: Gateway) -> None:
    """The gateway sends what is left of its deadline; a worker (local or behind a worker host)
    answers 504 rather than run a request nobody waits for any more."""
    from gateway.workers.local import UnixSocketTransport
    from gateway.workers.transport import DEADLINE_HEADER
    from gateway_client.protocol.codec import HEADER_LENGTH, Tensor, encode_tensor_parts

    worker = UnixSocketTransport(str(gateway.routes()["digits"]["workers"][0]["socket"]))
    body, length = encode_tensor_parts("inputs", [Tensor("input", np.ones((1, 64), np.float32))])
    try:
        gone = await worker.request("POST", "/infer", body, {HEADER_LENGTH: str(length), DEADLINE_HEADER: "0"},
                                    timeout=10)
        fresh = await worker.request("POST", "/infer", body, {HEADER_LENGTH: str(length), DEADLINE_HEADER: "5000"},
                                     timeout=10)
    finally:
        await worker.aclose()
    assert gone.status == 504 and b"deadline" in gone.body
    assert fresh.status == 200


async def _until_quiet(b: Batcher) -> None:
    """Lone requests until the run-time average says runs take microseconds (the first is unknown)."""
    for _ in range(50):
        await b.submit({"x": np.ones((1, 4), np.float32)})
        if b.quiet:
            return
    raise AssertionError("fast runs never made the batcher quiet")


@pytest.mark.anyio
async def test_a_request_alone_runs_at_once_as_its_batch_of_one_would() -> None:
    rec = Recorder()
    rec.gate.set()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.005)
    assert not b.quiet, "not started"
    b.start()
    assert not b.quiet, "the first run's cost is unknown"
    await _until_quiet(b)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    batches, requests, singles = b.stats.batches, b.stats.requests, b.stats.sizes.get(1, 0)
    queued = await b.submit({"x": x})
    now = b.run_now({"x": x})
    for a, c in zip(now, queued):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(now[0], x * 2)
    assert (b.stats.batches, b.stats.requests, b.stats.sizes[1]) == (batches + 2, requests + 2, singles + 2)
    assert b.stats.immediate == 1 and rec.calls[-2:] == [2, 2]
    await b.stop()
    assert not b.quiet, "stopped"


@pytest.mark.anyio
async def test_the_batcher_is_not_quiet_while_requests_wait_or_batch_or_runs_are_slow() -> None:
    delay = {"s": 0.0}

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        import time

        time.sleep(delay["s"])
        return [inputs["x"] + 1]

    b = Batcher(run, batchable=True, max_batch_size=8, max_queue_delay_s=0.001)
    b.start()
    await _until_quiet(b)
    waiting = asyncio.ensure_future(b.submit({"x": np.ones((1, 4), np.float32)}))
    await asyncio.sleep(0)  # it is queued; the batcher has not taken it yet
    assert b.depth == 1 and not b.quiet, "a request is waiting: the next must queue behind it"
    await waiting
    await asyncio.gather(*(b.submit({"x": np.ones((1, 4), np.float32)}) for _ in range(3)))
    assert not b.quiet, "the last batch held several requests: the next waits for company"
    await _until_quiet(b)  # a batch of one again (a run the machine happened to slow may take a few)
    delay["s"] = 0.01
    for _ in range(20):
        await b.submit({"x": np.ones((1, 4), np.float32)})
        if not b.quiet:
            break
    assert not b.quiet, "runs got slow: they belong in the session thread, not on the loop"
    await b.stop()


@pytest.mark.anyio
async def test_a_request_run_at_once_is_padded_to_its_bucket_and_dropped_past_its_deadline() -> None:
    import time

    from gateway.workers.batcher import DeadlineExceeded

    rec = Recorder()
    rec.gate.set()
    b = Batcher(rec.run, batchable=True, max_batch_size=8, max_queue_delay_s=0.0, buckets=(4, 8))
    b.start()
    await _until_quiet(b)
    x = np.full((1, 4), 3.0, np.float32)
    doubled, sums = b.run_now({"x": x})
    assert rec.calls[-1] == 4, "one row ran as a bucket of four"
    np.testing.assert_array_equal(doubled, x * 2)
    assert sums.shape == (1, 1)
    calls, expired = len(rec.calls), b.stats.expired
    with pytest.raises(DeadlineExceeded):
        b.run_now({"x": x}, time.monotonic() - 0.001)
    assert len(rec.calls) == calls and b.stats.expired == expired + 1, "counted, never run"
    await b.stop()
