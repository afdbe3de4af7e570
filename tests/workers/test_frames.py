"""Frames between the gateway and a local worker: many inferences over one connection, answered
in any order, each to its own caller; and a worker that sends anything else is cut off."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.workers.frames import HEAD, MAX_ANSWER_BYTES, PREFACE, FrameError, FrameReader, frame_head
from gateway.workers.local import UnixSocketTransport, fetch_health
from gateway.workers.transport import AnswerTooLarge, WorkerConnectionLost
from gateway_client.protocol.codec import Tensor, decode_tensor_message, encode_tensor_message
from tests.conftest import Gateway


def test_the_reader_finds_every_frame_whatever_pieces_the_bytes_arrive_in() -> None:
    rng = random.Random(7)
    sent = [(i, rng.randrange(600), rng.randrange(50), rng.randbytes(rng.choice([0, 1, 15, 16, 17, 5000])))
            for i in range(200)]
    stream = b"".join(frame_head(len(p), i, f, h) + p for i, f, h, p in sent)
    reader = FrameReader(limit=1 << 20)
    got = []
    at = 0
    while at < len(stream):
        step = rng.choice([1, 3, 16, 17, 100, 4096, 20000])
        got += reader.feed(stream[at:at + step])
        at += step
    assert got == sent


def test_the_reader_refuses_an_oversized_frame_before_buffering_it() -> None:
    reader = FrameReader(limit=1000)
    assert reader.feed(frame_head(1000, 1, 200, 0) + b"x" * 1000) == [(1, 200, 0, b"x" * 1000)]
    with pytest.raises(FrameError, match="1001 bytes"):
        reader.feed(frame_head(1001, 2, 200, 0))


def _digits_inputs(seed: int, rows: int = 1) -> list[Tensor]:
    return [Tensor("input", np.random.default_rng(seed).uniform(0, 16, (rows, 64)).astype(np.float32))]


@pytest.mark.anyio
async def test_concurrent_inferences_share_one_connection_and_batches_and_each_gets_its_own_answer(
        gateway: Gateway, models_root: Path) -> None:
    entry = gateway.routes()["digits"]["workers"][0]
    session = ort.InferenceSession(str(models_root / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    before = fetch_health(str(entry["socket"]))
    assert before is not None
    worker = UnixSocketTransport(str(entry["socket"]))
    try:
        requests = [_digits_inputs(seed, rows=1 + seed % 3) for seed in range(48)]
        answers = await asyncio.gather(*(worker.infer(inputs, timeout=10) for inputs in requests))
        assert worker._channel is not None and not worker._idle, "one framed connection, no HTTP ones"
    finally:
        await worker.aclose()
    for inputs, outputs in zip(requests, answers):
        expected = session.run(None, {"input": inputs[0].array})[0]
        assert outputs[0].array.shape == expected.shape
        np.testing.assert_allclose(outputs[0].array, expected, rtol=1e-5, atol=1e-6)
    after = fetch_health(str(entry["socket"]))
    assert after is not None
    assert after["requests"] - before["requests"] == 48  # type: ignore[operator]
    assert after["batches"] - before["batches"] < 48, "they ran in shared batches"  # type: ignore[operator]


def test_the_worker_answers_frames_with_their_ids_and_drops_what_its_deadline_passed(gateway: Gateway) -> None:
    path = str(gateway.routes()["digits"]["workers"][0]["socket"])
    body, length = encode_tensor_message("inputs", _digits_inputs(1))
    bad = b'{"inputs": "no"}'
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(PREFACE + frame_head(len(body), 7, 0, length) + body  # no time left: dropped
                  + frame_head(len(body), 9, 5000, length) + body
                  + frame_head(len(bad), 11, 5000, len(bad)) + bad)
        reader, answers = FrameReader(limit=1 << 20), dict[int, tuple[int, int, bytes]]()
        while len(answers) < 3:
            chunk = s.recv(65536)
            assert chunk, "the worker closed the connection"
            answers.update({i: (status, n, payload) for i, status, n, payload in reader.feed(chunk)})
    assert answers[7][0] == 504 and b"deadline" in answers[7][2]
    status, n, payload = answers[9]
    assert status == 200 and decode_tensor_message(payload, n, "outputs")[0].array.shape == (1, 10)
    assert answers[11][0] == 400


def test_a_lone_frame_is_answered_in_the_turn_it_arrives_and_as_a_queued_one_would_be(
        gateway: Gateway, models_root: Path) -> None:
    """A frame that arrives alone while the worker's batcher is quiet skips the queue: the same
    answers (and errors) as the batch path, counted as ``immediate`` in the worker's health."""
    path = str(gateway.routes()["digits"]["workers"][0]["socket"])
    session = ort.InferenceSession(str(models_root / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    reader, answers = FrameReader(limit=1 << 20), dict[int, tuple[int, int, bytes]]()

    def send(s: socket.socket, frames: list[tuple[int, int, bytes, int]]) -> None:
        s.sendall(b"".join(frame_head(len(body), i, deadline, length) + body for i, deadline, body, length in frames))
        while not all(i in answers for i, _, _, _ in frames):
            chunk = s.recv(65536)
            assert chunk, "the worker closed the connection"
            answers.update({i: (status, n, payload) for i, status, n, payload in reader.feed(chunk)})

    inputs = {seed: _digits_inputs(seed, rows=1 + seed % 2) for seed in range(23)}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(PREFACE)
        body, length = encode_tensor_message("inputs", inputs[0])
        for i in range(200, 220):  # until the worker has timed its runs (the first goes to the session thread)
            send(s, [(i, 5000, body, length)])
        before = fetch_health(path)
        assert before is not None
        for seed in range(20):  # one at a time: each arrives alone
            body, length = encode_tensor_message("inputs", inputs[seed])
            send(s, [(seed, 5000, body, length)])
        send(s, [(seed, 5000, *encode_tensor_message("inputs", inputs[seed])) for seed in (20, 21, 22)])  # together
        body, length = encode_tensor_message("inputs", inputs[0])
        send(s, [(100, 0, body, length)])  # alone, with no time left
        send(s, [(101, 5000, b'{"inputs": "no"}', 16)])  # alone, malformed
    after = fetch_health(path)
    assert after is not None
    for seed, tensors in inputs.items():
        status, n, payload = answers[seed]
        assert status == 200
        expected = session.run(None, {"input": tensors[0].array})[0]
        np.testing.assert_allclose(decode_tensor_message(payload, n, "outputs")[0].array, expected, rtol=1e-5, atol=1e-6)
    assert answers[100][0] == 504 and b"deadline" in answers[100][2]
    assert answers[101][0] == 400
    assert after["requests"] - before["requests"] == 23  # type: ignore[operator]
    assert after["expired"] - before["expired"] == 1  # type: ignore[operator]
    # A lone frame queues while the batcher is not quiet (a run the busy machine slowed raises the
    # average for a few); the three sent together never run at once.
    assert 10 <= after["immediate"] - before["immediate"] <= 20  # type: ignore[operator]


@contextlib.asynccontextmanager
async def _fake_worker(tmp_path: Path, answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                       ) -> AsyncIterator[UnixSocketTransport]:
    """A transport to a stand-in worker that reads the preface, then plays ``answer``."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            await answer(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    path = str(tmp_path / "w.sock")
    server = await asyncio.start_unix_server(serve, path)
    worker = UnixSocketTransport(path)
    try:
        yield worker
    finally:
        await worker.aclose()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # the server's side of the connection closes too


async def _request_id(reader: asyncio.StreamReader) -> int:
    length, request_id, _, _ = HEAD.unpack(await reader.readexactly(HEAD.size))
    await reader.readexactly(length)
    return int(request_id)


@pytest.mark.anyio
async def test_a_worker_that_claims_an_enormous_answer_is_cut_off_and_its_callers_fail(tmp_path: Path) -> None:
    async def lie(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id = await _request_id(reader)
        writer.write(frame_head(MAX_ANSWER_BYTES + 1, request_id, 200, 0) + b"\0" * 65536)
        await writer.drain()
        await reader.read()  # the gateway hangs up

    async with _fake_worker(tmp_path, lie) as worker:
        with pytest.raises(AnswerTooLarge, match="claimed more than its request allows"):
            await worker.infer(_digits_inputs(0), timeout=5)


@pytest.mark.anyio
async def test_an_answer_past_its_requests_bound_fails_that_request_at_its_head_and_the_connection(
        tmp_path: Path) -> None:
    """A request's bound (``answer_bound``: 64 KiB and its rows, for a model declared ``batch``)
    holds the answer to it, not only the 256 MiB every frame is held to; the other requests on
    the connection fail as on any connection the worker broke."""
    async def lie(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_id(reader)
        second = await _request_id(reader)
        writer.write(frame_head(64 << 20, second, 200, 0) + b"\0" * 65536)  # 64 MiB claimed, for 1 MiB
        await writer.drain()
        await reader.read()

    async with _fake_worker(tmp_path, lie) as worker:
        first = asyncio.create_task(worker.infer(_digits_inputs(0), timeout=5, limit=1 << 20))
        await asyncio.sleep(0.05)
        with pytest.raises(AnswerTooLarge, match="a frame of 67108864 bytes \\(at most 1048576\\)"):
            await worker.infer(_digits_inputs(1), timeout=5, limit=1 << 20)
        with pytest.raises(WorkerConnectionLost, match="answered another request beyond its limit") as lost:
            await first
        assert not isinstance(lost.value, AnswerTooLarge)


@pytest.mark.anyio
async def test_a_late_answer_is_still_held_to_its_requests_bound(tmp_path: Path) -> None:
    """A request given up on (its deadline passed) may still be answered: within its own bound."""
    late: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def answer_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id = await _request_id(reader)
        await late
        writer.write(frame_head(64 << 20, request_id, 200, 0) + b"\0" * 65536)
        await writer.drain()
        await reader.read()

    async with _fake_worker(tmp_path, answer_late) as worker:
        with pytest.raises(TimeoutError):
            await worker.infer(_digits_inputs(0), timeout=0.2, limit=1 << 20)
        channel = worker._channel
        assert channel is not None and not channel.closed
        late.set_result(0)
        for _ in range(100):
            if channel.closed:
                break
            await asyncio.sleep(0.02)
        assert channel.closed, "64 MiB claimed for a request bounded at 1 MiB"


@pytest.mark.anyio
async def test_an_answer_to_no_request_is_ignored_and_a_silent_worker_times_out(tmp_path: Path) -> None:
    async def stray_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id = await _request_id(reader)
        body, n = encode_tensor_message("outputs", [Tensor("probabilities", np.full((1, 10), 0.5, np.float32))])
        writer.write(frame_head(len(body), request_id + 1000, 200, n) + body)  # nobody asked for that one
        await writer.drain()
        await reader.read()

    async with _fake_worker(tmp_path, stray_then_silent) as worker:
        with pytest.raises(TimeoutError):
            await worker.infer(_digits_inputs(0), timeout=0.5)
        assert worker._channel is not None and not worker._channel.waiting, "nothing left waiting"


@pytest.mark.anyio
async def test_a_worker_that_dies_mid_request_fails_its_callers_and_the_next_request_reconnects(
        tmp_path: Path) -> None:
    served: list[int] = []

    async def die_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_id = await _request_id(reader)
        served.append(request_id)
        if len(served) == 1:
            writer.close()  # as a worker killed mid-request
            return
        body, n = encode_tensor_message("outputs", [Tensor("probabilities", np.full((1, 10), 0.25, np.float32))])
        writer.write(frame_head(len(body), request_id, 200, n) + body)
        await writer.drain()
        await reader.read()

    async with _fake_worker(tmp_path, die_once) as worker:
        with pytest.raises(WorkerConnectionLost):
            await worker.infer(_digits_inputs(0), timeout=5)
        outputs = await worker.infer(_digits_inputs(0), timeout=5)
        assert outputs[0].array.tolist() == [[0.25] * 10]
    assert len(served) == 2


def test_frame_heads_are_four_little_endian_words() -> None:
    """As ``gateway.workers.frames`` documents them (a worker written elsewhere relies on it)."""
    assert HEAD.size == 16 and frame_head(1, 2, 3, 4) == struct.pack("<4I", 1, 2, 3, 4)
