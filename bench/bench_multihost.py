"""Benchmark: one gateway host against two, on the namespace network of
``tests/faults/test_multihost.py`` (a Redis host, two gateway hosts, two worker hosts, a client host).

``digits`` with 1-row binary requests from the client host by ``wrk`` (mutual TLS through the
bench's shim): ``--clients`` connections to gateway host 1 alone, then half of them to each
gateway host, interleaved over ``--rounds``. Limits are shared through Redis (every policy on,
quotas too large to trip). Prints the total req/s of each mode, their ratio and each process's CPU,
which says what limits the total. Needs root (namespaces), ``wrk`` and a C compiler.

    sudo python bench/bench_multihost.py [--seconds 8] [--rounds 2] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_gateway import LUA, _bodies, _cpu_ticks, _descendants, build_shim, start_gateway  # noqa: E402

from tests.faults.test_multihost import Hosts, Network  # noqa: E402


def _wrk(net: Network, urls: list[str], connections: int, seconds: float, env: dict[str, str],
         script: Path) -> float:
    """Total req/s of one ``wrk`` per URL, run together on the client host."""
    procs = [subprocess.Popen(["ip", "netns", "exec", net.ns("client"), "wrk", "-t1", f"-c{connections // len(urls)}",
                               f"-d{int(seconds)}s", "-s", str(script), f"{url}/v2/models/digits/infer"],
                              stdout=subprocess.PIPE, text=True, env=env) for url in urls]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if errors:
            raise SystemExit(f"non-2xx answers: {errors.group(1)}\n{out}")
        total += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("network namespaces need root")
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-multihost-"))
    shim, bodies = build_shim(tmp), _bodies(tmp)
    proc, _, token = start_gateway(tmp, 1, "cpu")  # the PKI, keys and signed models of this run
    proc.terminate()
    proc.wait(30)
    script = tmp / "bench.lua"
    script.write_text(LUA)
    body = bodies["digits"]
    net = Network()
    net.up()
    try:
        hosts = Hosts(net, tmp, Path(tempfile.mkdtemp(prefix="gateway-bench-hosts-")), tmp / "models",
                      budget_rows="1000000000/day")
        hosts.start_all()
        secret = __import__("json").loads((tmp / "credentials.json").read_text())["principals"]["demo"]["client_secret"]
        env = {**os.environ, "LD_PRELOAD": str(shim), "WRK_CLIENT_CERT": str(tmp / "certs/client-demo.pem"),
               "WRK_CLIENT_KEY": str(tmp / "certs/client-demo.key"), "BENCH_BODY": str(body[0]),
               "BENCH_CTYPE": body[1], "BENCH_HEADER_LENGTH": body[2],
               "BENCH_AUTH": f"Bearer {hosts.token('demo', secret)}"}
        pids: dict[int, str] = {}
        for name, p in hosts.procs.items():
            pids.update({pid: f"{name}:{role}" for pid, role in _descendants(p.pid).items()})
        modes = {"one gateway": [hosts.url("gw1")], "two gateways": [hosts.url("gw1"), hosts.url("gw2")]}
        results: dict[str, list[float]] = {m: [] for m in modes}
        _wrk(net, modes["two gateways"], args.clients, 2, env, script)  # warm both
        for round_ in range(args.rounds):
            for mode, urls in modes.items():
                before, t0 = _cpu_ticks(list(pids)), time.monotonic()
                rps = _wrk(net, urls, args.clients, args.seconds, env, script)
                after, wall = _cpu_ticks(list(pids)), time.monotonic() - t0
                hz = os.sysconf("SC_CLK_TCK")
                cpu = {role: round(100 * (after[pid] - before[pid]) / hz / wall) for pid, role in pids.items()
                       if pid in before and pid in after and after[pid] > before[pid]}
                print(f"round {round_} {mode:12s} {rps:9.1f} req/s  cpu % {cpu}", flush=True)
                results[mode].append(rps)
    finally:
        if "hosts" in locals():
            hosts.stop()
        net.down()
    one = statistics.mean(results["one gateway"])
    two = statistics.mean(results["two gateways"])
    print(f"\none gateway host {one:.1f} req/s, two {two:.1f} req/s: {two / one:.2f}x on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
