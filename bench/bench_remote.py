"""Benchmark: a model served through a remote worker host (TCP + mutual TLS on loopback) against
the same model on a local worker (Unix socket), in one run.

``digits`` at 16 clients (the cheapest model, where the transport's cost shows most), the two
modes interleaved over ``--rounds`` rounds. The worker host is ``gateway worker serve`` with the
same batching settings as the local worker; its front, which joins each TLS connection to a
worker, is one more process on the same two cores. Prints req/s, p50, p99, each process's CPU
and the remote/local ratio. Requires ``wrk`` and a C compiler.

    python bench/bench_remote.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import MODELS, _bodies, _descendants, build_shim, start_gateway, wrk  # noqa: E402

from tests.conftest import free_port  # noqa: E402
from tests.workers.test_remote import WorkerHost  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-remote-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    results: dict[str, list[dict[str, object]]] = {"local": [], "remote": []}
    port = free_port()
    host: WorkerHost | None = None
    for round_ in range(args.rounds):
        for mode in results:
            extra, tables = "", {}
            if mode == "remote":
                extra = (f'[remote_workers]\ncert_file = "{tmp}/certs/gateway-client.pem"\n'
                         f'key_file = "{tmp}/certs/gateway-client.key"\n')
                tables = {"digits": f'workers = 0\nendpoints = ["127.0.0.1:{port}"]\n'}
                if host is None:
                    for kind in (["worker", "bench"], ["gateway"]):
                        subprocess.run([sys.executable, "-m", "gateway", "pki", "issue", *kind, "--certs",
                                        str(tmp / "certs")], check=True, capture_output=True)
                    spec = MODELS["digits"]  # the local worker's batching, on the worker host
                    host = WorkerHost(tmp, tmp, tmp / "models", "worker-bench", port,
                                      f"intra_op_threads = {spec['threads']}\nmax_queue_delay_ms = 1.0\n")
                    host.start()
            proc, gw_port, token = start_gateway(tmp, 1, "cpu", extra=extra, model_tables=tables)
            try:
                pids = _descendants(proc.pid)
                if mode == "remote" and host is not None and host.proc is not None:
                    pids.update({pid: f"host:{role}" for pid, role in _descendants(host.proc.pid).items()})
                url = f"https://127.0.0.1:{gw_port}"
                wrk(url, "digits", args.clients, 2, bodies["digits"], tmp / "certs", shim, pids, token)
                row = wrk(url, "digits", args.clients, args.seconds, bodies["digits"], tmp / "certs", shim, pids, token)
                print(f"round {round_} {mode:6s} {row['rps']:9.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                      f"p99 {row['p99_ms']:.2f} ms  non-2xx {row['non_2xx']}  cpu {row['cpu_percent']}", flush=True)
                results[mode].append(row)
            finally:
                proc.terminate()
                proc.wait(30)
    if host is not None:
        host.stop()
    means = {mode: statistics.mean(float(r["rps"]) for r in rows) for mode, rows in results.items()}  # type: ignore[arg-type]
    print(f"\n{'worker':8s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'/local':>7s}")
    for mode, rows in results.items():
        p50 = statistics.mean(float(r["p50_ms"]) for r in rows)  # type: ignore[arg-type]
        p99 = statistics.mean(float(r["p99_ms"]) for r in rows)  # type: ignore[arg-type]
        print(f"{mode:8s} {means[mode]:9.1f} {p50:8.2f} {p99:8.2f} {means[mode] / means['local']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
