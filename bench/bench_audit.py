"""Benchmark: what the audit log costs, against the same gateway with auditing off.

In one run, ``digits`` at 16 clients (where per-request overhead shows most) with ``[audit]``
off and on (every request's record written, hash-chained and fsynced before its response,
in group commits), interleaved over ``--rounds``. Prints req/s, p50, p99, the ratio to "off",
and the records per second the log absorbed. Requires ``wrk`` and a C compiler.

    python bench/bench_audit.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import _bodies, _descendants, build_shim, start_gateway, wrk  # noqa: E402

MODES = {"off": "[audit]\nenabled = false\n", "on": "[audit]\nenabled = true\n"}


def _records(run: Path) -> int:
    return sum(f.read_bytes().count(b'"kind":"request"') for f in (run / "audit").rglob("*.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-audit-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    results: dict[str, list[tuple[dict[str, object], float]]] = {m: [] for m in MODES}
    try:
        for round_ in range(args.rounds):
            for mode, section in MODES.items():
                run = tmp / f"{mode}-{round_}"
                run.mkdir()
                proc, port, token = start_gateway(run, 1, "cpu", None, section)
                try:
                    pids = _descendants(proc.pid)
                    url = f"https://127.0.0.1:{port}"
                    wrk(url, "digits", args.clients, 2, bodies["digits"], run / "certs", shim, pids, token)
                    before = _records(run) if mode == "on" else 0
                    row = wrk(url, "digits", args.clients, args.seconds, bodies["digits"], run / "certs", shim, pids,
                              token)
                    per_s = (_records(run) - before) / args.seconds if mode == "on" else 0.0
                    print(f"round {round_} audit {mode:3s} {row['rps']:9.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                          f"p99 {row['p99_ms']:.2f} ms  records/s {per_s:.0f}", flush=True)
                    results[mode].append((row, per_s))
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.mean(float(r["rps"]) for r, _ in results["off"])  # type: ignore[arg-type]
    print(f"\n{'audit':6s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'/off':>7s} {'records/s':>10s}")
    for mode, rows in results.items():
        rps = statistics.mean(float(r["rps"]) for r, _ in rows)  # type: ignore[arg-type]
        p50 = statistics.mean(float(r["p50_ms"]) for r, _ in rows)  # type: ignore[arg-type]
        p99 = statistics.mean(float(r["p99_ms"]) for r, _ in rows)  # type: ignore[arg-type]
        recs = statistics.mean(p for _, p in rows)
        print(f"{mode:6s} {rps:9.1f} {p50:8.2f} {p99:8.2f} {rps / base:7.3f} {recs:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
