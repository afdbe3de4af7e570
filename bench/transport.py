"""Benchmark: the gateway-to-worker transport: httpx, the gateway's own HTTP client, and frames.

Starts one real ``digits`` worker and sends it the same binary request, sequentially and from 16
concurrent tasks, through (a) httpx's ``AsyncClient`` over its Unix-socket transport, (b)
``gateway.workers.transport.UnixSocketTransport`` over HTTP (``request``) and (c) the same
transport's frames (``infer``: many requests over one connection); prints requests/s, the CPU
each request cost this (the gateway's) side and the worker, and the ratios to (a), all in one run.
This is the measurement behind the choice of (c) for the request path.

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

from gateway.workers.local import UnixSocketTransport, fetch_health  # noqa: E402
from gateway.workers.transport import HTTPTransport  # noqa: E402
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rate(send: Callable[[], Awaitable[None]], total: int, concurrency: int,
               worker: int) -> tuple[float, float, float]:
    """Requests/s, and this process's and the worker's CPU microseconds per request."""
    for _ in range(20):
        await send()
    mine, theirs = time.process_time(), cpu_seconds(worker)

    async def loop(n: int) -> None:
        for _ in range(n):
            await send()

    started = time.perf_counter()
    await asyncio.gather(*(loop(total // concurrency) for _ in range(concurrency)))
    done = total // concurrency * concurrency
    return (done / (time.perf_counter() - started), (time.process_time() - mine) / done * 1e6,
            (cpu_seconds(worker) - theirs) / done * 1e6)


async def measure(sock: Path, total: int, worker: int) -> None:
    body, n = encode_tensor_message("inputs", [Tensor("input", np.full((1, 64), 8.0, np.float32))])
    headers = {HEADER: str(n)}
    hx = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)), base_url="http://worker",
                           limits=httpx.Limits(max_connections=64))
    own = UnixSocketTransport(str(sock))

    async def via_httpx() -> None:
        (await hx.post("/infer", content=body, headers=headers)).raise_for_status()

    inputs = [Tensor("input", np.full((1, 64), 8.0, np.float32))]

    async def via_own() -> None:  # the same encoding and decoding as frames, over HTTP
        await HTTPTransport.infer(own, inputs, timeout=10)

    async def via_frames() -> None:
        await own.infer(inputs, timeout=10)

    print(f"{'client':12s} {'concurrency':>11s} {'req/s':>9s} {'µs CPU here':>12s} {'µs CPU worker':>14s}")
    for concurrency in (1, 16):
        a = await rate(via_httpx, total, concurrency, worker)
        for name, send in (("httpx", via_httpx), ("own HTTP", via_own), ("own frames", via_frames)):
            r, here, there = a if send is via_httpx else await rate(send, total, concurrency, worker)
            ratio = "" if send is via_httpx else f"   ({r / a[0]:.1f}x httpx)"
            print(f"{name:12s} {concurrency:11d} {r:9.0f} {here:12.0f} {there:14.0f}{ratio}")
    await hx.aclose()
    await own.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    sock = Path(tempfile.mkdtemp(prefix="gateway-transport-")) / "digits.sock"
    worker = start_worker(sock)
    try:
        uvloop.run(measure(sock, args.requests, worker.pid))
    finally:
        worker.terminate()
        worker.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
