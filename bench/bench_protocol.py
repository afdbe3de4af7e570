"""Benchmark: the gateway's HTTP protocol's own cost per request, in-process, for A/B work on it.

No TLS, no socket, no application: ``TLSHttpToolsProtocol`` (the protocol each TLS connection of
``gateway serve`` gets) is given a 1.1 KB JSON ``digits`` request over a transport that records
nothing, and an ASGI app that reads the body and answers at once; the next request is given once
the answer has left. What is left is what the protocol (uvicorn's parser callbacks, the gateway's
head and timer bookkeeping, the pipelining bound, the coalesced write) costs per request. Steady
enough to compare two checkouts: run it in each, interleaved.

    python bench/bench_protocol.py [--requests 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.server.protocol import TLSHttpToolsProtocol

BODY = (b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":['
        + b",".join([b"0.5"] * 64) + b"]}]}")
REQUEST = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost:8443\r\nAuthorization: Bearer "
           + b"x" * 600 + b"\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


class NullTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8443)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def run(requests: int, rounds: int) -> None:
    config = Config(app=app, log_level="warning")
    config.load()
    protocol = TLSHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = NullTransport()
    protocol.connection_made(transport)

    async def serve(count: int) -> None:
        for _ in range(count):
            written = transport.writes
            protocol.data_received(REQUEST)
            while transport.writes == written:  # the task runs, answers, and the write is flushed
                await asyncio.sleep(0)

    await serve(2000)  # warm up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await serve(requests)
        times.append((time.perf_counter() - started) / requests * 1e6)
    print(f"{min(times):.2f} µs a request (best of {rounds}; all: {', '.join(f'{t:.2f}' for t in times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    uvloop.run(run(args.requests, args.rounds))


if __name__ == "__main__":
    main()
