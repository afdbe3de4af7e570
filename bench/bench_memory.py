"""Benchmark: does memory grow with requests? Resident set after 1,000 and after 100,000.

One gateway (every limit on in memory, quotas too large to trip, audit on, the demo guard and
extraction monitor on) serves ``digits`` to ``wrk`` at 16 clients. The resident set (``VmRSS``)
of the serving process and of each worker is read after the first ``--warm`` requests and again
after ``--total``; a leak shows as a ratio above 1.1. Requires ``wrk`` and a C compiler.

    python bench/bench_memory.py [--warm 1000] [--total 100000]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway import LIMITS, _bodies, _descendants, build_shim, start_gateway, wrk  # noqa: E402


def rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def _name(pid: int, role: str) -> str:
    """The serving process, a worker, or one of the serving process's helpers (by command line)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    if b"resource_tracker" in args:
        return "resource-tracker"
    if b"multiprocessing" in args:
        return "decoder"
    return role


def settle(pids: dict[int, str], timeout_s: float = 30.0) -> None:
    """Wait until no process's resident set moves for a second: the decoder processes finish
    starting (imports, ~80 MiB) a few seconds after the gateway answers ready, which would read
    as growth between the two readings."""
    deadline = time.monotonic() + timeout_s
    last: dict[int, int] = {}
    while time.monotonic() < deadline:
        now = {pid: rss_kib(pid) for pid in pids}
        if now == last:
            return
        last = now
        time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", type=int, default=1000, help="requests before the first reading")
    parser.add_argument("--total", type=int, default=100_000, help="requests before the second reading")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-memory-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    proc, port, token = start_gateway(tmp, 1, "cpu", LIMITS["memory"])
    try:
        pids = {pid: _name(pid, role) for pid, role in _descendants(proc.pid).items()
                if role == "gateway" or role.startswith("worker:")}
        settle(pids)
        url = f"https://127.0.0.1:{port}"
        done = 0
        readings: list[dict[int, int]] = []
        for target in (args.warm, args.total):
            while done < target:  # wrk runs for a time, not a count: short runs until the count is reached
                seconds = max(1.0, min(10.0, (target - done) / 2000))
                row = wrk(url, "digits", args.clients, seconds, bodies["digits"], tmp / "certs", shim, pids, token)
                done += int(float(row["rps"]) * int(seconds))
                if row["non_2xx"]:
                    raise SystemExit(f"{row['non_2xx']} refused requests: {row['raw']}")
            readings.append({pid: rss_kib(pid) for pid in pids})
            print(f"after ~{done} requests: " + ", ".join(f"{pids[p]} {kib / 1024:.1f} MiB" for p, kib in readings[-1].items()),
                  flush=True)
        print(f"\n{'process':22s} {'RSS@warm MiB':>13s} {'RSS@total MiB':>14s} {'ratio':>6s}")
        for pid, role in pids.items():
            first, last = readings[0][pid], readings[1][pid]
            print(f"{role + f'[{pid}]':22s} {first / 1024:13.1f} {last / 1024:14.1f} {last / max(first, 1):6.3f}")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
