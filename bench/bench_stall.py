"""Benchmark: how long one large request holds up the others.

A real ``gateway serve`` (``bench_gateway.start_gateway``) serves the demo models and ``texts``, a
model that answers its BYTES input back (Identity on a string tensor). One client sends small
``digits`` requests in a loop, every 10 ms; another sends one large request, and the small
requests' latency while it runs is compared with their latency in a quiet window of the same
length before it, in the same run:

* ``text``: ``texts`` with N empty strings in binary (4 bytes each; at most
  ``server.max_bytes_elements``, which the bench raises to N);
* ``numbers``: ``resnetish`` with a binary batch of about the same body size, for comparison.

    python bench/bench_stall.py [--elements 65536 262144] [--seconds 2]

Prints, per large request: its body size, how long it took, and the small requests' p50 and
largest latency during it against the quiet window's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gateway import LIMITS, MODELS, start_gateway  # noqa: E402

from gateway_client.protocol.codec import Tensor, encode_tensor_message  # noqa: E402


def _texts_model(models: Path) -> None:
    """``texts``: a string tensor in, the same out, as a tokenizer-in-the-graph model takes text."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["echo"])], "texts",
                              [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("echo", TensorProto.STRING, ["n"])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    folder = models / "texts" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({
        "name": "texts", "version": "1", "device": "auto",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "echo", "datatype": "BYTES", "shape": [-1]}],
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()}}))


def _text_body(count: int) -> tuple[bytes, int]:
    raw = b"\0\0\0\0" * count
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [count],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "echo", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, len(header)


def _numbers_body(size: int) -> tuple[bytes, int]:
    rows = max(1, size // (3 * 224 * 224 * 4))
    x = np.random.default_rng(0).uniform(-1, 1, (rows, 3, 224, 224)).astype(np.float32)
    return encode_tensor_message("inputs", [Tensor("input", x)])


class Prober:
    """Small ``digits`` requests every 10 ms on their own connection, each one's start and latency."""

    def __init__(self, url: str, ctx: ssl.SSLContext, token: str) -> None:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]}
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

        def run() -> None:
            with httpx.Client(base_url=url, verify=ctx, headers={"Authorization": f"Bearer {token}"}) as c:
                while not self.stop.is_set():
                    started = time.monotonic()
                    c.post("/v2/models/digits/infer", json=body).raise_for_status()
                    self.samples.append((started, time.monotonic() - started))
                    time.sleep(0.01)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def between(self, start: float, end: float) -> list[float]:
        return [latency for at, latency in self.samples if start <= at < end or start <= at + latency < end]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, nargs="+", default=[65536, 262144],
                        help="BYTES elements of each large text request")
    parser.add_argument("--seconds", type=float, default=2.0, help="the quiet window before each large request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        models = tmp / "models"
        for model in MODELS:
            shutil.copytree(ROOT / "models" / model, models / model,
                            ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
        _texts_model(models)
        proc, port, token = start_gateway(tmp, 1, "cpu", limits=LIMITS["memory"],
                                          server=f"max_bytes_elements = {max(args.elements)}\n",
                                          extra="[models.texts]\n")
        try:
            ctx = ssl.create_default_context(cafile=str(tmp / "certs/ca.pem"))
            ctx.load_cert_chain(tmp / "certs/client-demo.pem", tmp / "certs/client-demo.key")
            url = f"https://localhost:{port}"
            prober = Prober(url, ctx, token)
            time.sleep(1.0)  # its connection made, its first answers in
            cases = [(f"text, {n:,} elements", "texts", *_text_body(n)) for n in args.elements]
            cases += [(f"numbers, {len(cases[-1][2]) / 1e6:.1f} MB", "resnetish", *_numbers_body(len(cases[-1][2])))]
            print(f"{'large request':<28} {'MB':>6} {'took s':>7}   small requests: p50 / max ms, quiet -> during")
            with httpx.Client(base_url=url, verify=ctx, timeout=300,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                for label, model, body, header_length in cases:
                    quiet_start = time.monotonic()
                    time.sleep(args.seconds)
                    started = time.monotonic()
                    answer = client.post(f"/v2/models/{model}/infer", content=body,
                                         headers={"Inference-Header-Content-Length": str(header_length)})
                    ended = time.monotonic()
                    answer.raise_for_status()
                    quiet, during = prober.between(quiet_start, started), prober.between(started, ended)
                    print(f"{label:<28} {len(body) / 1e6:>6.1f} {ended - started:>7.2f}   "
                          f"{statistics.median(quiet) * 1000:.1f} / {max(quiet) * 1000:.1f} -> "
                          f"{statistics.median(during) * 1000:.1f} / {max(during) * 1000:.1f}"
                          f"  ({len(during)} requests)")
            prober.stop.set()
            prober.thread.join()
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
