"""Benchmark: what the audit log costs, against the same gateway with auditing off.

In one run, ``digits`` at 1 and 16 clients with ``[audit]`` off, on with ``durability =
"process"`` (each record written before its answer, fsynced within ``fsync_interval_ms``) and on
with ``durability = "fsync"`` (each record fsynced before its answer, in group commits),
interleaved over ``--rounds``. Prints req/s, p50, p99, the ratio to "off", what the log adds to
the median latency, and the records per second the log absorbed. Requires ``wrk`` and a C compiler.

    python bench/bench_audit.py [--seconds 10] [--rounds 2] [--clients 1 16] [--modes off process fsync]
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

MODES = {
    "off": "[audit]\nenabled = false\n",
    "process": '[audit]\nenabled = true\ndurability = "process"\n',
    "fsync": '[audit]\nenabled = true\ndurability = "fsync"\n',
}


def _records(run: Path) -> int:
    return sum(f.read_bytes().count(b'"kind":"request"') for f in (run / "audit").rglob("*.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-audit-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    results: dict[tuple[str, int], list[tuple[dict[str, object], float]]] = {}
    try:
        for round_ in range(args.rounds):
            for mode in args.modes:
                run = tmp / f"{mode}-{round_}"
                run.mkdir()
                proc, port, token = start_gateway(run, 1, "cpu", None, MODES[mode])
                try:
                    pids = _descendants(proc.pid)
                    url = f"https://127.0.0.1:{port}"
                    wrk(url, "digits", max(args.clients), 2, bodies["digits"], run / "certs", shim, pids, token)
                    for clients in args.clients:
                        before = _records(run)
                        row = wrk(url, "digits", clients, args.seconds, bodies["digits"], run / "certs", shim, pids,
                                  token)
                        per_s = (_records(run) - before) / args.seconds
                        print(f"round {round_} audit {mode:7s} c={clients:<3d} {row['rps']:9.1f} req/s  "
                              f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  records/s {per_s:.0f}", flush=True)
                        results.setdefault((mode, clients), []).append((row, per_s))
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def mean(mode: str, clients: int, key: str) -> float:
        return statistics.mean(float(r[key]) for r, _ in results[(mode, clients)])  # type: ignore[arg-type]

    print(f"\n{'audit':8s} {'clients':>7s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'/off':>7s} {'p50-off':>8s} "
          f"{'records/s':>10s}")
    for (mode, clients), rows in results.items():
        base = ("off", clients) in results
        ratio = mean(mode, clients, "rps") / mean("off", clients, "rps") if base else float("nan")
        delta = mean(mode, clients, "p50_ms") - mean("off", clients, "p50_ms") if base else float("nan")
        print(f"{mode:8s} {clients:7d} {mean(mode, clients, 'rps'):9.1f} {mean(mode, clients, 'p50_ms'):8.2f} "
              f"{mean(mode, clients, 'p99_ms'):8.2f} {ratio:7.3f} {delta:+8.2f} {statistics.mean(p for _, p in rows):10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
