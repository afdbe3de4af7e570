"""Benchmark: the application's own cost per request, in-process, for A/B work on the request path.

No TLS, no HTTP, no worker process: the ASGI app that ``gateway serve`` runs (every middleware
layer and stage, audit on, every limit in memory with quotas too large to trip, a real token from
the built-in issuer and a client certificate identity in the scope) is called directly, and the
worker is an in-memory transport running the real ``digits`` model. What is left is the Python
work the gateway adds to each inference, the part a profile of the serving process attributes to
the application. Far steadier than a ``wrk`` run on a shared machine: compare two checkouts with it.

    python bench/bench_app.py [--requests 20000] [--rounds 3] [--clients 1] [--audit process] [--breakdown]

``--clients N`` keeps N requests in flight, as N keep-alive clients would: their answers complete
in the same turns of the event loop, and the audit log writes each turn's records together.
``--audit off|process|fsync`` sets ``[audit]`` (``off``: no log; the others its ``durability``):
the log's cost is the difference between two runs.

``--breakdown`` also times each middleware layer, each stage and the audit record (inclusive
microseconds per request; a layer's own cost is its time less the next one's; the audit record is
written inside the response's send, so every layer's time includes it). The timers add a few
microseconds of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import orjson
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.devsetup import init  # noqa: E402
from gateway.security.tls import identity_from_der  # noqa: E402
from gateway.workers.memory import InMemoryTransport  # noqa: E402
from gateway.workers.pool import WorkerPool  # noqa: E402

HUGE = "1000000000/minute"
LIMITS = f"""
[limits]
storage = "memory://"
per_address = "{HUGE}"
per_principal = "{HUGE}"
per_principal_model = "{HUGE}"
global_limit = "{HUGE}"
budget_inferences = "1000000000/day"
budget_rows = "1000000000/day"
"""


async def _call(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, bytes]:
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(dict(scope), receive, send)
    return status, b"".join(chunks)


async def _token(app: Any, scope: dict[str, Any], client_id: str, secret: str) -> str:
    form = f"grant_type=client_credentials&client_id={client_id}&client_secret={secret}".encode()
    token_scope = {**scope, "path": "/oauth/token", "raw_path": b"/oauth/token",
                   "headers": [(b"content-type", b"application/x-www-form-urlencoded"),
                               (b"content-length", str(len(form)).encode())]}
    status, body = await _call(app, token_scope, form)
    if status != 200:
        raise SystemExit(f"no token: {status} {body[:300]!r}")
    return str(orjson.loads(body)["access_token"])


async def measure(run: Path, requests: int, rounds: int, clients: int = 1) -> list[float]:
    config = load_config(run / "gateway.toml")
    session = ort.InferenceSession(str(Path(config.models_root) / "digits" / "1" / "model.onnx"))
    worker = InMemoryTransport(lambda inputs: session.run(None, inputs), ["probabilities"])
    pool = WorkerPool.of(config, {"digits": [worker]})
    app = create_app(config, str(run), pool=pool)
    creds = orjson.loads((run / "credentials.json").read_bytes())["principals"]["demo"]
    der = x509.load_pem_x509_certificate(Path(creds["cert"]).read_bytes()).public_bytes(Encoding.DER)
    base = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
            "server": ("127.0.0.1", config.server.port), "client": ("127.0.0.1", 40000), "root_path": "",
            "query_string": b"", "extensions": {"tls": {"client_identity": identity_from_der(der)}}}
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}]})
    per_request: list[float] = []
    async with app.router.lifespan_context(app):
        for client in pool.workers["digits"]:
            client.healthy = True
        token = await _token(app, {**base, "headers": []}, creds["client_id"], creds["client_secret"])
        path = "/v2/models/digits/infer"
        scope = {**base, "path": path, "raw_path": path.encode(),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"authorization", f"Bearer {token}".encode())]}
        for _ in range(200):  # warm-up
            status, answer = await _call(app, scope, body)
            if status != 200:
                raise SystemExit(f"inference refused: {status} {answer[:300]!r}")
        async def client(n: int) -> None:
            for _ in range(n):
                await _call(app, scope, body)

        for _ in range(rounds):
            started = time.perf_counter()
            await asyncio.gather(*(client(requests // clients) for _ in range(clients)))
            per_request.append((time.perf_counter() - started) / (requests // clients * clients) * 1e6)
    return per_request


def install_timers() -> dict[str, int]:
    """Wrap the middleware layers, the stages and the audit record with timers; totals in ns."""
    import collections

    from starlette.middleware import Middleware

    import gateway.app as app_module
    import gateway.endpoints.v2 as v2_module
    from gateway.audit.middleware import AuditMiddleware

    totals: dict[str, int] = collections.Counter()

    class TimedStage:
        def __init__(self, stage: Any) -> None:
            self.stage = stage

        async def __call__(self, call: Any) -> None:
            started = time.perf_counter_ns()
            await self.stage(call)
            totals[f"stage {self.stage.name}"] += time.perf_counter_ns() - started

    run = v2_module.run_stages

    async def run_stages(stages: Any, call: Any) -> None:
        await run([TimedStage(stage) for stage in stages], call)

    v2_module.run_stages = run_stages  # type: ignore[assignment]

    def timed(cls: Any) -> Any:
        class Timed(cls):  # type: ignore[misc, valid-type]
            def __init__(self, app: Any, **kwargs: Any) -> None:
                async def inner(scope: Any, receive: Any, send: Any) -> None:
                    started = time.perf_counter_ns()
                    await app(scope, receive, send)
                    totals[f"below {cls.__name__}"] += time.perf_counter_ns() - started
                super().__init__(inner, **kwargs)
        return Timed

    stack = app_module.middleware_stack
    app_module.middleware_stack = lambda *a, **k: [Middleware(timed(m.cls), *m.args, **m.kwargs)  # type: ignore[assignment]
                                                   for m in stack(*a, **k)]
    record = AuditMiddleware._record

    async def timed_record(self: Any, scope: Any, status: int, started: float) -> None:
        t = time.perf_counter_ns()
        await record(self, scope, status, started)
        totals["audit record"] += time.perf_counter_ns() - t

    AuditMiddleware._record = timed_record  # type: ignore[method-assign]
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--audit", choices=["off", "process", "fsync"], default="process")
    parser.add_argument("--breakdown", action="store_true", help="time each layer, stage and the audit record")
    args = parser.parse_args()
    totals = install_timers() if args.breakdown else None
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-app-"))
    try:
        models = tmp / "models"
        for name in ("digits", "resnetish"):  # the configuration gateway init writes names both
            shutil.copytree(ROOT / "models" / name, models / name,
                            ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
        init(tmp / "run", models)  # no held-out data here: the guard is off, as the peer harness runs it
        with open(tmp / "run" / "gateway.toml", "a") as f:
            f.write(LIMITS)
        os.environ["GATEWAY__AUDIT__ENABLED"] = str(args.audit != "off").lower()
        if args.audit != "off":
            os.environ["GATEWAY__AUDIT__DURABILITY"] = args.audit
        results = asyncio.run(measure(tmp / "run", args.requests, args.rounds, args.clients))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("µs per request, by round: " + ", ".join(f"{r:.1f}" for r in results))
    print(f"median {statistics.median(results):.1f} µs per request ({1e6 / statistics.median(results):,.0f} requests/s "
          "of application work on one core)")
    if totals:
        calls = (200 + args.requests * args.rounds)  # the warm-up's requests are timed too
        for name, ns in sorted(totals.items(), key=lambda item: -item[1]):
            print(f"{ns / calls / 1000:8.1f} µs  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
