"""Worker entry point: ``python -m gateway.workers.worker --listen-fd N ...``, model bytes on stdin.

One process, one ``onnxruntime.InferenceSession``, one Unix socket, which the supervisor bound and
handed over as descriptor ``N``: the worker needs no write access anywhere. It applies its own
isolation (see ``isolation``), then listens on the socket (so the socket's peer credentials are
its own unprivileged process, which the gateway verifies), reads the verified model bytes from its
standard input (so it needs no read access to the model repository and no plaintext copy on
disk), builds the session with the configured providers, and serves the gateway:

* ``GET /health``: readiness, active execution providers, queue depth and batch statistics;
* ``POST /infer``: all-binary tensors in, all-binary tensors out (what a worker host's front passes on);
* frames (``gateway.workers.frames``) on a connection that opens with their preface: the local
  gateway's inferences, many at once.

Exit codes are ``gateway.workers.exits.ExitCode``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import os
import socket
import sys
import time
from typing import Any

import numpy as np
import orjson

from gateway.workers.batcher import Batcher, DeadlineExceeded
from gateway.workers.exits import ExitCode
from gateway.workers.frames import NO_DEADLINE, PREFACE, FrameError, FrameReader, FrameWriter, frame_head
from gateway.workers.isolation import apply_isolation
from gateway.workers.session import NotText, load_session, session_inputs
from gateway.workers.transport import DEADLINE_HEADER
from gateway_client.protocol.codec import HEADER_LENGTH, Chunk, Tensor, decode_tensor_message, encode_tensor_parts
from gateway_client.protocol.errors import ProtocolError

log = logging.getLogger("gateway.worker")

HEADER = HEADER_LENGTH.encode()
DEADLINE = DEADLINE_HEADER.encode()
MAX_REQUEST_BYTES = 0xFFFFFFFF
"""Frames from the gateway are as large as the gateway allows (``server.max_body_bytes``)."""


class WorkerApp:
    """A raw ASGI app: the worker speaks only to the gateway, over its private socket."""

    def __init__(self, session: Any, name: str, args: argparse.Namespace, isolation: dict[str, object]) -> None:
        self.session = session
        self.name = name
        self.output_names = [o.name for o in session.get_outputs()]
        # Requests are joined only when every input and output opens its first dimension under one
        # name ("batch"): an output whose first dimension is another one need not follow the rows.
        firsts = {t.shape[0] if t.shape else 1 for t in [*session.get_inputs(), *session.get_outputs()]}
        batchable = len(firsts) == 1 and isinstance(next(iter(firsts)), str)
        self.batcher = Batcher(
            self._run,
            batchable=batchable,
            max_batch_size=args.max_batch_size,
            max_queue_delay_s=args.max_queue_delay_ms / 1000,
            buckets=batch_buckets(args.batch_buckets, args.max_batch_size, session.get_providers()),
        )
        self.health: dict[str, Any] = {
            "ready": True,
            "model": name,
            "pid": os.getpid(),
            "providers": session.get_providers(),
            "batchable": batchable,
            "batch_buckets": list(self.batcher.buckets),
            "threads": {"intra_op": args.intra_op_threads, "spinning": args.intra_op_spinning},
            "isolation": isolation,
        }

    def _run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(self.output_names, inputs))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/health":
            body = {**self.health, "queue_depth": self.batcher.depth, "batches": self.batcher.stats.batches,
                    "requests": self.batcher.stats.requests,
                    "batch_sizes": {str(k): v for k, v in self.batcher.stats.sizes.items()},
                    "queue_seconds": self.batcher.stats.queue_seconds,
                    "compute_seconds": self.batcher.stats.compute_seconds, "expired": self.batcher.stats.expired,
                    "immediate": self.batcher.stats.immediate, "unbatchable": self.batcher.stats.unbatchable}
            await _respond(send, 200, orjson.dumps(body), b"application/json")
        elif scope["path"] == "/infer" and scope["method"] == "POST":
            await self._infer(scope, receive, send)
        else:
            await _respond(send, 404, b'{"error":"not found"}', b"application/json")

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.batcher.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _infer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        headers = dict(scope["headers"])
        raw_length, raw_deadline = headers.get(HEADER, b""), headers.get(DEADLINE, b"")
        if not raw_length.isdigit():
            await _respond(send, 400, orjson.dumps({"error": "missing or malformed Inference-Header-Content-Length"}),
                           b"application/json")
            return
        # The gateway's deadline, as what is left of it (clocks of two hosts need not agree).
        expires = time.monotonic() + int(raw_deadline) / 1000 if raw_deadline.isdigit() else math.inf
        status, payload, length = await self.answer(b"".join(chunks), int(raw_length), expires)
        if status != 200:
            await _respond(send, status, b"".join(payload), b"application/json")
            return
        await _respond(send, 200, b"".join(payload), b"application/octet-stream", [(HEADER, str(length).encode())])

    async def answer(self, message: bytes, header_length: int, expires: float) -> tuple[int, list[Chunk], int]:
        """One inference: a binary tensor message of inputs in; its status, payload (the outputs'
        tensor message, or ``{"error": ...}``) and the payload's JSON header length out."""
        try:
            tensors = decode_tensor_message(message, header_length, "inputs")
            outputs = await self.batcher.submit(session_inputs(tensors), expires)
        except Exception as exc:
            return _failure(exc)
        return self._answer(outputs)

    def answer_now(self, message: bytes, header_length: int, expires: float) -> tuple[int, list[Chunk], int]:
        """``answer``, in the caller's turn of the event loop; only while ``batcher.quiet``."""
        try:
            tensors = decode_tensor_message(message, header_length, "inputs")
            outputs = self.batcher.run_now(session_inputs(tensors), expires)
        except Exception as exc:
            return _failure(exc)
        return self._answer(outputs)

    def _answer(self, outputs: list[np.ndarray]) -> tuple[int, list[Chunk], int]:
        payload, length = encode_tensor_parts("outputs", [Tensor(n, a) for n, a in zip(self.output_names, outputs)])
        return 200, payload, length


def _failure(exc: Exception) -> tuple[int, list[Chunk], int]:
    """An inference that failed, as its status and ``{"error": ...}`` payload."""
    if isinstance(exc, ProtocolError):
        return 400, [orjson.dumps({"error": exc.detail})], 0
    if isinstance(exc, DeadlineExceeded):
        return 504, [orjson.dumps({"error": str(exc)})], 0
    if isinstance(exc, NotText):
        return 422, [orjson.dumps({"error": str(exc)})], 0
    # onnxruntime's own errors: invalid argument or a failed run
    status = 422 if "INVALID_ARGUMENT" in str(exc) or "Invalid" in type(exc).__name__ else 500
    return status, [orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})], 0


class FramedChannel:
    """The worker's side of a connection that speaks frames (``gateway.workers.frames``): each
    request runs as its own task, so they batch together; answers leave as they finish. A request
    that arrives alone while the batcher is ``quiet`` is answered in the turn that brought it."""

    def __init__(self, app: WorkerApp, transport: Any) -> None:
        self.app = app
        self.reader = FrameReader(limit=MAX_REQUEST_BYTES)
        self.writer = FrameWriter(transport)
        self.tasks: set[asyncio.Task[None]] = set()

    def feed(self, data: bytes) -> None:
        """Raises ``FrameError`` when the bytes are not frames."""
        now = time.monotonic()
        frames = self.reader.feed(data)
        if len(frames) == 1 and self.app.batcher.quiet:  # alone: it would run at once anyway
            request_id, deadline_ms, header_length, payload = frames[0]
            status, parts, length = self.app.answer_now(payload, header_length, _expires(deadline_ms, now))
            # Written at the end of the turn like every answer, so that answers finishing close
            # together leave together (written at once, each woke the serving process on its own:
            # 13% fewer requests/s at sixteen clients, bench/RESULTS.md).
            self.writer.write(frame_head(sum(map(len, parts)), request_id, status, length), parts)
            return
        loop = asyncio.get_running_loop()
        for request_id, deadline_ms, header_length, payload in frames:
            task = loop.create_task(self._serve(request_id, payload, header_length, _expires(deadline_ms, now)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, request_id: int, message: bytes, header_length: int, expires: float) -> None:
        status, payload, length = await self.app.answer(message, header_length, expires)
        self.writer.write(frame_head(sum(map(len, payload)), request_id, status, length), payload)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


def _expires(deadline_ms: int, now: float) -> float:
    return math.inf if deadline_ms == NO_DEADLINE else now + deadline_ms / 1000


async def _respond(
    send: Any, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protocol_for(app: WorkerApp) -> type:
    """uvicorn's HTTP protocol for the worker's socket, which also speaks frames to a connection
    that opens with ``PREFACE``."""
    from gateway.httpserver import BufferedBodyProtocol

    class WorkerProtocol(BufferedBodyProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sniffed = b""
            self.channel: FramedChannel | None = None
            self.http = False

        def data_received(self, data: bytes) -> None:
            if self.channel is not None:
                self._frames(data)
            elif self.http:
                super().data_received(data)
            else:
                self.sniffed += data
                if len(self.sniffed) < len(PREFACE) and PREFACE.startswith(self.sniffed):
                    return  # too little yet to tell
                data, self.sniffed = self.sniffed, b""
                if data.startswith(PREFACE):
                    self.channel = FramedChannel(app, self.transport)
                    self._frames(data[len(PREFACE):])
                else:
                    self.http = True
                    super().data_received(data)

        def _frames(self, data: bytes) -> None:
            assert self.channel is not None
            try:
                self.channel.feed(data)
            except FrameError as exc:
                log.warning("closing a connection that sent no frames: %s", exc)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.channel is not None:
                self.channel.close()
            super().connection_lost(exc)

    return WorkerProtocol


def batch_buckets(setting: str, max_batch_size: int, providers: list[str]) -> tuple[int, ...]:
    """``auto``: every batch padded to the maximum on CUDA (one shape, never re-planned), none
    on the CPU; ``off``; or a comma-separated list of sizes."""
    if setting == "off" or (setting == "auto" and "CUDAExecutionProvider" not in providers):
        return ()
    if setting == "auto":
        return (max_batch_size,)
    return tuple(sorted({int(s) for s in setting.split(",")}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gateway-worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen-fd", type=int, required=True, help="a bound Unix socket to listen on")
    p.add_argument("--name", required=True)
    p.add_argument("--model-version", default="", help="the version of the model it runs (reported in its health)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--memory-limit-mb", type=int, default=0)
    p.add_argument("--cuda-tf32", action="store_true", help="allow TF32 maths on CUDA")
    p.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction, default=True,
                   help="let ONNX Runtime's threads spin while they wait for work")
    p.add_argument("--batch-buckets", default="auto", help="auto, off, or comma-separated batch sizes")
    p.add_argument("--uid", type=int, default=None, help="drop to this user id when started as root")
    p.add_argument("--gid", type=int, default=None, help="... and this group id")
    return p.parse_args(argv)


def _preload() -> None:
    """Import everything the worker will need while the interpreter's files are still readable.

    The worker drops to an unprivileged user before it parses the model; from then on it may not
    be able to read the interpreter's standard library (under root's home, say).
    """
    import onnxruntime  # noqa: F401
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.uvloop  # noqa: F401
    import uvloop  # noqa: F401

    import gateway.httpserver  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = os.getppid()
    logging.basicConfig(level=logging.WARNING, format=f"worker {args.name}[%(process)d] %(message)s")
    model = sys.stdin.buffer.read()
    _preload()
    import uvicorn

    from gateway.httpserver import freeze_startup_heap

    listener = socket.socket(fileno=args.listen_fd)
    isolation = apply_isolation(args.uid, args.gid, args.memory_limit_mb, parent)
    listener.listen(1024)  # after the drop: the socket's peer credentials are this process's
    try:
        session = load_session(model, args.device, args.intra_op_threads, args.cuda_tf32, args.intra_op_spinning)
    except Exception as exc:
        print(f"model {args.name} does not load: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.MODEL)
    digest = hashlib.sha256(model).hexdigest()  # which signed model this is, for a remote gateway to see
    del model
    app = WorkerApp(session, args.name, args, isolation)
    app.health.update(model_sha256=digest, version=args.model_version)
    freeze_startup_heap()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", http=protocol_for(app),
        loop="uvloop", ws="none", timeout_keep_alive=3600, backlog=1024, proxy_headers=False,
    )
    uvicorn.Server(config).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
