"""Benchmark: what decoding a body costs in memory, per shape, against the body's own size.

A real ``gateway serve`` (max_body_bytes 40 MiB) gets, one at a time, ordinary bodies and the
hostile shapes of the hardening work (a JSON BYTES tensor of one long string and 1,000 empty ones;
binary BYTES shapes with no or minimal data; a long string among numbers; millions of nested empty
lists). Before each, the peak resident memory (``VmHWM``) of the serving process and of its
decoder processes is reset; after it, the growth is read and divided by the body's size.

The stated bound: the serving process grows by at most 6 x the body (plus a few MiB of allocator
noise): the body twice while it is read and joined, and the decoded tensors (at most 4 x, for
8-byte values from 2-byte JSON numbers). Bodies over 64 KiB are decoded in the decoder processes,
whose growth (up to ~32 x for millions of nested empty lists) is capped by
``server.decode_memory_mb``. Exits 1 if the serving process exceeds its bound.

    python bench/bench_decode_memory.py
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import ROOT, _descendants, start_gateway  # noqa: E402

sys.path.insert(0, str(ROOT))
from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402

MAX_BODY = 40 * 1024 * 1024
BOUND = 6


def _binary(name: str, datatype: str, shape: list[int], data: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def _json(item: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [item]}).encode(), {"Content-Type": "application/json"}


def bodies() -> list[tuple[str, str, bytes, dict[str, str]]]:
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    binary, n = encode_tensor_message("inputs", [Tensor("input", x)])
    return [
        ("digits JSON, batch 1", "digits", *_json({"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64})),
        ("digits JSON, batch 20,000", "digits", *_json({"name": "input", "datatype": "FP32", "shape": [20000, 64],
                                                         "data": [8.0] * (20000 * 64)})),
        ("resnetish JSON, batch 1", "resnetish", *_json({"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                                          "data": np.round(x, 3).ravel().tolist()})),
        ("resnetish binary, batch 1", "resnetish", binary, {"Inference-Header-Content-Length": str(n),
                                                            "Content-Type": "application/octet-stream"}),
        ("BYTES JSON: one 200,000-char string + 1,000 empty", "digits",
         *_json({"name": "input", "datatype": "BYTES", "shape": [1001], "data": ["x" * 200_000] + [""] * 1000})),
        ("BYTES binary: shape [67108864], no data", "digits", *_binary("input", "BYTES", [67_108_864], b"")),
        ("BYTES binary: 8,388,000 empty elements", "digits", *_binary("input", "BYTES", [8_388_000], b"\0" * 33_552_000)),
        ("FP32 JSON: a 200,000-char string among numbers", "digits",
         *_json({"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ["x" * 200_000] + [8.0] * 63})),
        ("FP32 JSON: 4,000,000 nested empty lists", "digits",
         b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":[' + b"[]," * 4_000_000 + b"[]]}]}",
         {"Content-Type": "application/json"}),
    ]


def _peak(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def _reset(pids: list[int]) -> dict[int, int]:
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return {pid: _peak(pid) for pid in pids}


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-memory-"))
    proc, port, token = start_gateway(tmp, 1, "cpu", server=f"max_body_bytes = {MAX_BODY}\n")
    ctx = ssl.create_default_context(cafile=str(tmp / "certs/ca.pem"))
    ctx.load_cert_chain(tmp / "certs/client-demo.pem", tmp / "certs/client-demo.key")
    print(f"{'body':50s} {'bytes':>10s} {'status':>6s} {'serving +MiB':>12s} {'x body':>7s} "
          f"{'decoder +MiB':>12s} {'x body':>7s}")
    worst = 0.0
    try:
        with httpx.Client(base_url=f"https://localhost:{port}", verify=ctx, timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            for label, model, body, headers in bodies():
                c.post(f"/v2/models/{model}/infer", content=body, headers=headers)  # warm: pools, decoders
                time.sleep(0.3)
                decoders = [p for p, role in _descendants(proc.pid).items() if role == "gateway" and p != proc.pid]
                before = _reset([proc.pid, *decoders])
                status = c.post(f"/v2/models/{model}/infer", content=body, headers=headers).status_code
                serving = _peak(proc.pid) - before[proc.pid]
                decoding = max((_peak(p) - before[p] for p in decoders), default=0)
                worst = max(worst, (serving - 4 * 2**20) / len(body))
                print(f"{label:50s} {len(body):10d} {status:6d} {serving / 2**20:12.1f} {serving / len(body):7.2f} "
                      f"{decoding / 2**20:12.1f} {decoding / len(body):7.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nserving process: worst growth beyond 4 MiB of allocator noise: {worst:.2f} x the body (bound: {BOUND} x)")
    return 0 if worst <= BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
