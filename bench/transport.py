"""Benchmark: the gateway-to-worker transport, httpx against the gateway's own Unix-socket client.

Starts one real ``digits`` worker and sends it the same binary request, sequentially and from 16
concurrent tasks, through (a) httpx's ``AsyncClient`` over its Unix-socket transport and (b)
``gateway.workers.transport.UnixSocketTransport``; prints requests/s and the ratio between them, all in
one run. This is the measurement behind the choice of (b) for the request path.

    python bench/transport.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.workers.transport import UnixSocketTransport, fetch_health  # noqa: E402
from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

HEADER = "inference-header-content-length"


def start_worker(sock: Path) -> subprocess.Popen[bytes]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))  # as the supervisor does: bound here, listened on by the worker
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.workers.worker", "--listen-fd", str(listener.fileno()), "--name", "digits",
         "--device", "cpu", "--max-batch-size", "64"],
        stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, pass_fds=(listener.fileno(),),
    )
    listener.close()
    assert proc.stdin is not None
    proc.stdin.write((ROOT / "models/digits/1/model.onnx").read_bytes())
    proc.stdin.close()
    for _ in range(300):
        if fetch_health(str(sock)):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("worker did not start")


async def rate(send: Callable[[], Awaitable[None]], total: int, concurrency: int) -> float:
    for _ in range(20):
        await send()

    async def loop(n: int) -> None:
        for _ in range(n):
            await send()

    started = time.perf_counter()
    await asyncio.gather(*(loop(total // concurrency) for _ in range(concurrency)))
    return (total // concurrency * concurrency) / (time.perf_counter() - started)


async def measure(sock: Path, total: int) -> None:
    body, n = encode_tensor_message("inputs", [Tensor("input", np.full((1, 64), 8.0, np.float32))])
    headers = {HEADER: str(n)}
    hx = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://worker",
                           limits=httpx.Limits(max_connections=64))
    own = UnixSocketTransport(str(sock))

    async def via_httpx() -> None:
        (await hx.post("/infer", content=body, headers=headers)).raise_for_status()

    async def via_own() -> None:
        assert (await own.request("POST", "/infer", body, headers)).status == 200

    print(f"{'client':12s} {'concurrency':>11s} {'req/s':>9s}")
    for concurrency in (1, 16):
        a = await rate(via_httpx, total, concurrency)
        b = await rate(via_own, total, concurrency)
        print(f"{'httpx':12s} {concurrency:11d} {a:9.0f}")
        print(f"{'own':12s} {concurrency:11d} {b:9.0f}   ({b / a:.1f}x httpx)")
    await hx.aclose()
    await own.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    sock = Path(tempfile.mkdtemp(prefix="gateway-transport-")) / "digits.sock"
    worker = start_worker(sock)
    try:
        uvloop.run(measure(sock, args.requests))
    finally:
        worker.terminate()
        worker.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
