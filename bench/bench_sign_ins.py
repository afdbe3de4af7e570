"""Benchmark: what a burst of sign-ins costs the inference traffic beside it.

Each token request costs a scrypt of the client's secret (~50 ms of a core, 16 MiB). A real
``gateway serve`` (``bench_gateway.start_gateway``) answers small ``digits`` requests from one
client address every 10 ms while, from other addresses, many clients ask the token endpoint for
tokens with the right secret as fast as they can. Printed per setting of
``issuer.sign_in_threads``, run one after the other in the same run: the tokens issued, the
inference requests' p50, p90 and largest latency before and during the burst, and the serving
process's resident set during it.

    python bench/bench_sign_ins.py [--clients 48] [--seconds 8] [--threads 40 0]

``--threads 40`` is what the gateway did before the setting existed (a thread of anyio's default
pool per token request); 0 is the default (half the cores, at least one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gateway import LIMITS, MODELS, start_gateway  # noqa: E402

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]}


def _resident_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def measure(tmp: Path, threads: int, clients: int, seconds: float) -> dict[str, float]:
    os.environ["GATEWAY__ISSUER__SIGN_IN_THREADS"] = str(threads)
    proc, port, token = start_gateway(tmp, 1, "cpu", limits=LIMITS["memory"])
    try:
        ctx = ssl.create_default_context(cafile=str(tmp / "certs/ca.pem"))
        ctx.load_cert_chain(tmp / "certs/client-demo.pem", tmp / "certs/client-demo.key")
        url = f"https://localhost:{port}"
        demo = json.loads((tmp / "credentials.json").read_text())["principals"]["demo"]
        samples: list[tuple[float, float]] = []
        quiet = threading.Event()

        def infer() -> None:  # from 127.0.0.2: the burst's addresses' limits are not its own
            transport = httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")
            with httpx.Client(base_url=url, transport=transport, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                while not quiet.is_set():
                    started = time.monotonic()
                    client.post("/v2/models/digits/infer", json=BODY).raise_for_status()
                    samples.append((started, time.monotonic() - started))
                    time.sleep(0.01)

        issued = [0]
        lock = threading.Lock()

        def sign_in(n: int, until: float) -> None:
            transport = httpx.HTTPTransport(verify=ctx, local_address=f"127.0.1.{n + 1}")
            with httpx.Client(base_url=url, transport=transport, timeout=60) as client:
                while time.monotonic() < until:
                    answer = client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                         auth=(demo["client_id"], demo["client_secret"]))
                    if answer.status_code == 200:
                        with lock:
                            issued[0] += 1

        prober = threading.Thread(target=infer)
        prober.start()
        time.sleep(seconds / 2)
        started = time.monotonic()
        burst = [threading.Thread(target=sign_in, args=(n, started + seconds)) for n in range(clients)]
        for thread in burst:
            thread.start()
        time.sleep(seconds / 2)
        resident = _resident_mib(proc.pid)
        for thread in burst:
            thread.join()
        ended = time.monotonic()
        quiet.set()
        prober.join()
        before = sorted(latency for at, latency in samples if at < started)
        during = sorted(latency for at, latency in samples if started <= at < ended)
        return {"tokens_per_s": issued[0] / (ended - started), "resident_mib": resident,
                "before_p50_ms": 1000 * statistics.median(before), "before_max_ms": 1000 * before[-1],
                "p50_ms": 1000 * statistics.median(during), "p90_ms": 1000 * during[int(0.9 * len(during))],
                "max_ms": 1000 * during[-1]}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=48, help="clients asking for tokens at once")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the burst")
    parser.add_argument("--threads", type=int, nargs="+", default=[40, 0], help="issuer.sign_in_threads settings")
    args = parser.parse_args()
    print(f"{'sign_in_threads':>15} {'tokens/s':>9} {'RSS MiB':>8}   inference ms: p50 / max before -> "
          "p50 / p90 / max during")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        for model in MODELS:
            shutil.copytree(ROOT / "models" / model, tmp / "models" / model,
                            ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
        for threads in args.threads:
            r = measure(tmp, threads, args.clients, args.seconds)
            print(f"{threads:>15} {r['tokens_per_s']:>9.1f} {r['resident_mib']:>8.0f}   "
                  f"{r['before_p50_ms']:.1f} / {r['before_max_ms']:.0f} -> "
                  f"{r['p50_ms']:.1f} / {r['p90_ms']:.0f} / {r['max_ms']:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
