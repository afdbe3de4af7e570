"""Decoding request bodies without stalling the gateway.

A small body (``INLINE_MAX_BYTES`` of JSON; every ``digits`` request, and a binary request whose JSON
header is small and that carries no large BYTES data: its tensors are views of the body) is
decoded on the event loop: it costs microseconds. A larger one is decoded in a separate process (``server.decode_processes``, at most
``server.decode_memory_mb`` of address space each): a JSON parser holds the interpreter's lock
for its whole run (orjson took 0.3 to 5 s for 32 MB bodies on the two-core machine, depending on
their shape), so a thread would still stall every other request; a process does not, and a
hostile body's memory is spent, and bounded, there. Requests wait for a free decoder in order;
the bytes they hold are bounded by ``stages.body.InFlightBytes``.

Decoder processes run isolated like workers (no network, an unprivileged user, no core dumps)
when the gateway is root: they parse untrusted input. A decoder that dies is replaced, and the
request it was decoding gets 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import pwd
import signal
from concurrent.futures.process import BrokenProcessPool

from gateway.config import ServerConfig
from gateway.cpus import available_cpus
from gateway.errors import PayloadTooLarge, Unavailable, bad_request
from gateway.registry.manifest import TensorSpec
from gateway.registry.signature import Signature
from gateway.stages.base import InferCall
from gateway.stages.body import byte_count
from gateway_client.protocol.codec import DecodeLimits, InferRequest, decode_infer_request
from gateway_client.protocol.errors import ProtocolError

__all__ = ["INLINE_MAX_BYTES", "Decode", "Decoder", "decode_checked"]

log = logging.getLogger("gateway.decode")

INLINE_MAX_BYTES = 64 * 1024


@functools.lru_cache(maxsize=256)
def _signature(inputs: tuple[TensorSpec, ...], model: str) -> Signature:
    return Signature(inputs, model)


def decode_checked(body: bytes, header_length: int | None, limits: DecodeLimits, inputs: tuple[TensorSpec, ...],
                   model: str) -> InferRequest:
    """Decode against the model's declared inputs (wherever it runs: here or in a decoder process)."""
    return decode_infer_request(body, header_length, limits, _signature(inputs, model).expect)


def inline(body: bytes, header_length: int | None) -> bool:
    """Cheap enough for the event loop: a small JSON part, and no BYTES elements to walk in a large
    binary part (numeric binary tensors are views of the body, whatever their size)."""
    if header_length is None:
        return len(body) <= INLINE_MAX_BYTES
    if header_length > INLINE_MAX_BYTES:
        return False
    return len(body) - header_length <= INLINE_MAX_BYTES or b'"BYTES"' not in body[:header_length]


def _decoder_init(memory_mb: int, parent_pid: int, uid: int | None, gid: int | None) -> None:
    from gateway.workers.isolation import apply_isolation

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the gateway, which stops this
    apply_isolation(uid, gid, memory_mb, parent_pid, max_files=64)


class Decoder:
    def __init__(self, server: ServerConfig, limits: DecodeLimits | None = None) -> None:
        self.limits = limits or DecodeLimits(max_bytes_elements=server.max_bytes_elements)
        self.processes = server.decode_processes or max(1, min(4, available_cpus() // 2))
        self.memory_mb = server.decode_memory_mb
        self.identity: tuple[int | None, int | None] = (None, None)
        if os.geteuid() == 0 and server.worker_user:
            entry = pwd.getpwnam(server.worker_user)
            self.identity = (entry.pw_uid, entry.pw_gid)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"), initializer=_decoder_init,
                initargs=(self.memory_mb, os.getpid(), *self.identity))
        return self._executor

    async def warm(self) -> None:
        """Start the decoder processes now rather than on the first large body."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool(), os.getpid) for _ in range(self.processes)))

    async def decode(self, body: bytes, header_length: int | None, inputs: tuple[TensorSpec, ...],
                     model: str) -> InferRequest:
        try:
            if inline(body, header_length):
                return decode_checked(body, header_length, self.limits, inputs, model)
            pool = self._pool()
            return await asyncio.get_running_loop().run_in_executor(
                pool, decode_checked, body, header_length, self.limits, inputs, model)
        except ProtocolError as exc:
            raise bad_request(exc) from None
        except MemoryError:
            raise PayloadTooLarge(f"decoding this body needs more than the {self.memory_mb} MiB a decoder may use; "
                                  "send it with the binary tensor extension, or in smaller batches") from None
        except BrokenProcessPool:
            log.error("a decoder process died; starting new ones")
            if self._executor is pool:
                self._executor = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise Unavailable("the request could not be decoded (its decoder process died); retry shortly",
                              retry_after=1) from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class Decode:
    name = "decode"

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    async def __call__(self, call: InferCall) -> None:
        manifest = call.model.manifest
        header_length = byte_count(call.headers, "Inference-Header-Content-Length", max_digits=12)
        call.request = await self.decoder.decode(call.body, header_length, manifest.inputs, manifest.name)
