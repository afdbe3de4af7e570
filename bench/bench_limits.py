"""Benchmark: what rate limiting costs, with memory and with Redis storage, against no limits.

In one run, for ``digits`` at 16 clients (the cheapest model, where per-request overhead shows
most), it starts the gateway three ways, interleaved over ``--rounds`` rounds to spread the
machine's noise: limits off; every policy on (per address, principal, principal and model,
global, both budgets) in memory; the same in a local ``redis-server``, with the inference's
admission running while the worker computes (the default) and before it (``admission =
"before"``). No limit can trip (the quotas are huge): this measures the cost of counting. Prints
req/s, p50, p99, each mode's ratio to "none" and to "memory" in the same run, and the script calls
Redis counted per request (one, or less when concurrent requests share a call). Requires ``wrk``,
a C compiler and ``redis-server``.

    python bench/bench_limits.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import LIMITS, _bodies, _descendants, build_shim, start_gateway, wrk  # noqa: E402

from tests.conftest import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (apt-get install redis-server, or `make test-tools`)")
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-limits-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    results: dict[str, list[dict[str, object]]] = {"none": [], "memory": [], "redis": [], "redis-before": []}
    calls: dict[str, list[float]] = {"redis": [], "redis-before": []}
    try:
        for round_ in range(args.rounds):
            for mode in results:
                limits = {k: v.format(redis_port=redis_port) for k, v in LIMITS[mode].items()}
                run = tmp / f"{mode}-{round_}"
                run.mkdir()
                proc, port, token = start_gateway(run, 1, "cpu", limits)
                try:
                    pids = _descendants(proc.pid)
                    url = f"https://127.0.0.1:{port}"
                    wrk(url, "digits", args.clients, 2, bodies["digits"], run / "certs", shim, pids, token)
                    before = _script_calls(redis_port)
                    row = wrk(url, "digits", args.clients, args.seconds, bodies["digits"], run / "certs", shim, pids, token)
                    if mode in calls:
                        requests = float(row["rps"]) * args.seconds  # type: ignore[arg-type]
                        calls[mode].append((_script_calls(redis_port) - before) / max(requests, 1))
                    print(f"round {round_} {mode:7s} {row['rps']:9.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                          f"p99 {row['p99_ms']:.2f} ms  non-2xx {row['non_2xx']}", flush=True)
                    results[mode].append(row)
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.mean(float(r["rps"]) for r in results["none"])  # type: ignore[arg-type]
    memory = statistics.mean(float(r["rps"]) for r in results["memory"])  # type: ignore[arg-type]
    print(f"\n{'limits':12s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'/none':>7s} {'/memory':>8s} {'calls/req':>10s}")
    for mode, rows in results.items():
        rps = statistics.mean(float(r["rps"]) for r in rows)  # type: ignore[arg-type]
        p50 = statistics.mean(float(r["p50_ms"]) for r in rows)  # type: ignore[arg-type]
        p99 = statistics.mean(float(r["p99_ms"]) for r in rows)  # type: ignore[arg-type]
        per_request = f"{statistics.mean(calls[mode]):10.2f}" if mode in calls else f"{'':10s}"
        print(f"{mode:12s} {rps:9.1f} {p50:8.2f} {p99:8.2f} {rps / base:7.3f} {rps / memory:8.3f} {per_request}")
    return 0


def _script_calls(port: int) -> int:
    """How many script calls this Redis has answered."""
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
