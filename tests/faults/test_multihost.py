"""Scale-out on a network of hosts built from Linux network namespaces.

A Redis host, two gateway hosts, two worker hosts and a client host, each its own namespace,
joined by a bridge, on addresses of the documentation range 192.0.2.0/24 (RFC 5737) that exist
only inside those namespaces; the test creates and removes them itself and sends traffic nowhere
else. Under load from the client through both gateways (which share Redis and serve ``digits`` only
through the two worker hosts over mutual TLS):

- killing a worker host: answers are 200, or 503 with Retry-After; new requests go to the other
  worker host; the host's return is noticed;
- cutting Redis off: local limits, ``degraded`` in readiness, no 500; shared again on return;
- killing a gateway host: the other serves; restarted, it continues its audit chain;
- one budget shared across the two gateways;
- afterwards every answered request has exactly one audit record, on the gateway that answered
  it, and ``gateway audit verify`` passes on both.

Namespaces need root (CI runs as root); elsewhere the test skips and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.security.pki import issue_certificate, load_ca, write_key, write_pem
from tests.conftest import AUTH_POLICY

pytestmark = pytest.mark.slow

LOAD = Path(__file__).with_name("multihost_load.py")
ADDRESSES = {"redis": "192.0.2.10", "gw1": "192.0.2.21", "gw2": "192.0.2.22", "wk1": "192.0.2.31",
             "wk2": "192.0.2.32", "client": "192.0.2.50"}
REDIS_PASSWORD = "multihost-test"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Network:
    """The hosts: one namespace each, a veth pair to one bridge, one address."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000}"
        self.bridge = f"gwt{self.tag}br"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"gwt{self.tag}-{host}"

    def veth(self, host: str) -> str:
        return f"g{self.tag}{host}"

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for host, address in ADDRESSES.items():
            ns, veth = self.ns(host), self.veth(host)
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", veth + "p")
            _ip("link", "set", veth + "p", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "link", "set", veth + "p", "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def cut(self, host: str, cut: bool) -> None:
        """Take a host off the network (its cable pulled), or put it back."""
        _ip("link", "set", self.veth(host), "down" if cut else "up")

    def start(self, host: str, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, code: str) -> object:
        """Run Python ``code`` on the client host; what it prints, as JSON."""
        done = subprocess.run(["ip", "netns", "exec", self.ns("client"), sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)


def _kill(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root; this machine is not)")
    net = Network()
    try:
        net.up()
    except subprocess.CalledProcessError as exc:
        net.down()
        pytest.skip(f"network namespaces are not permitted here: {exc.stderr.decode(errors='replace').strip()}")
    yield net
    net.down()


class Hosts:
    """The processes of the five hosts, their configurations and logs."""

    def __init__(self, net: Network, pki: Path, tmp: Path, models_root: Path, budget_rows: str = "10000/day") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copytree(pki, tmp / "pki")  # certificates are issued into it: the session's stays as it is
        pki = tmp / "pki"
        self.net, self.pki, self.tmp, self.models_root = net, pki, tmp, models_root
        self.budget_rows = budget_rows
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        ca = load_ca(pki / "certs")
        certs = tmp / "certs"
        certs.mkdir()
        for host in ("gw1", "gw2"):
            issued = issue_certificate(ca, host, server=True, ips=(ADDRESSES[host],))
            write_key(certs / f"{host}.key", issued.key)
            write_pem(certs / f"{host}.pem", issued.cert)
        for host in ("wk1", "wk2"):
            issued = issue_certificate(ca, host, server=True, ips=(ADDRESSES[host],),
                                       uris=(f"spiffe://gateway.local/worker/{host}",))
            write_key(certs / f"{host}.key", issued.key)
            write_pem(certs / f"{host}.pem", issued.cert)
        subprocess.run([sys.executable, "-m", "gateway", "pki", "issue", "gateway", "--certs", str(pki / "certs")],
                       check=True, capture_output=True)
        shutil.copytree(pki / "issuer", tmp / "issuer")  # both gateways sign with one issuer key
        for host in ("gw1", "gw2"):
            (tmp / host).mkdir()
            (tmp / host / "gateway.toml").write_text(self._gateway_config(host))
        for host in ("wk1", "wk2"):
            (tmp / host).mkdir()
            (tmp / host / "worker.toml").write_text(self._worker_config(host))

    def _gateway_config(self, host: str) -> str:
        tmp, pki = self.tmp, self.pki
        return f"""
[server]
host = "0.0.0.0"
port = 8443
runtime_dir = "{tmp / host / 'run'}"
pid_file = "{tmp / host / 'gateway.pid'}"
request_timeout_s = 10
[tls]
cert_file = "{tmp}/certs/{host}.pem"
key_file = "{tmp}/certs/{host}.key"
client_ca_file = "{pki}/certs/ca.pem"
[auth]
audience = "https://gateway.test"
[issuer]
url = "https://gateway.test"
directory = "{tmp / 'issuer'}"
incidents_file = "{tmp / host / 'incidents.json'}"
{AUTH_POLICY}
[limits]
storage = "redis://:{REDIS_PASSWORD}@{ADDRESSES['redis']}:6379/0"
per_address = "1000000/minute"
per_principal = "1000000/minute"
failed_auth_per_address = "1000000/minute"
budget_inferences = ""
budget_rows = "{self.budget_rows}"
storage_timeout_s = 0.25
storage_retry_s = 1.0
[supply]
trusted_keys = ["{pki}/keys/model-signing.pub"]
[audit]
directory = "{tmp / host / 'audit'}"
signing_key = "{pki}/keys/audit-signing.key"
public_key = "{pki}/keys/audit-signing.pub"
replica = "{host}"
[remote_workers]
cert_file = "{pki}/certs/gateway-client.pem"
key_file = "{pki}/certs/gateway-client.key"
[models]
root = "{self.models_root}"
[models.digits]
workers = 0
endpoints = ["{ADDRESSES['wk1']}:9443", "{ADDRESSES['wk2']}:9443"]
max_batch_size = 64
"""

    def _worker_config(self, host: str) -> str:
        return f"""
[worker_host]
clients = ["spiffe://gateway.local/gateway"]
[server]
runtime_dir = "{self.tmp / host / 'run'}"
pid_file = "{self.tmp / host / 'worker.pid'}"
[tls]
cert_file = "{self.tmp}/certs/{host}.pem"
key_file = "{self.tmp}/certs/{host}.key"
client_ca_file = "{self.pki}/certs/ca.pem"
[supply]
trusted_keys = ["{self.pki}/keys/model-signing.pub"]
[models]
root = "{self.models_root}"
[models.digits]
listen = "{ADDRESSES[host]}:9443"
max_batch_size = 64
"""

    def start_redis(self) -> None:
        self.procs["redis"] = self.net.start("redis", [
            "redis-server", "--bind", ADDRESSES["redis"], "--port", "6379", "--requirepass", REDIS_PASSWORD,
            "--save", "", "--appendonly", "no", "--dir", str(self.tmp)], self.tmp / "redis.log")

    def start_worker_host(self, host: str) -> None:
        log = self.tmp / host / "worker-host.log"
        seen = log.read_text().count("Worker host ready") if log.exists() else 0
        self.procs[host] = self.net.start(host, [sys.executable, "-m", "gateway", "worker", "serve", "--config",
                                                 str(self.tmp / host / "worker.toml")], log)
        deadline = time.monotonic() + 60
        while log.read_text().count("Worker host ready") == seen:
            assert self.procs[host].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    def start_gateway(self, host: str) -> None:
        self.procs[host] = self.net.start(host, [sys.executable, "-m", "gateway", "serve", "--config",
                                                 str(self.tmp / host / "gateway.toml")], self.tmp / host / "gateway.log")

    def start_all(self) -> None:
        """Redis, both worker hosts, then both gateways, ready."""
        self.start_redis()
        for host in ("wk1", "wk2"):
            self.start_worker_host(host)
        for host in ("gw1", "gw2"):
            self.start_gateway(host)
        self.wait_ready("gw1", "gw2")

    def url(self, host: str) -> str:
        return f"https://{ADDRESSES[host]}:8443"

    def _tls(self) -> str:
        certs = self.pki / "certs"
        return (f"import httpx, json, ssl, time\nctx = ssl.create_default_context(cafile={str(certs / 'ca.pem')!r})\n"
                f"ctx.load_cert_chain({str(certs / 'client-demo.pem')!r}, {str(certs / 'client-demo.key')!r})\n")

    def wait_ready(self, *hosts: str, timeout_s: float = 90) -> None:
        urls = [self.url(h) for h in hosts]
        ready = self.net.client(self._tls() + f"""
deadline, pending = time.monotonic() + {timeout_s}, {urls!r}
while pending and time.monotonic() < deadline:
    for url in list(pending):
        try:
            if httpx.get(url + "/v2/health/ready", verify=ctx, timeout=5).status_code == 200:
                pending.remove(url)
        except httpx.TransportError:
            pass
    time.sleep(0.3)
print(json.dumps(pending))
""")
        assert ready == [], f"not ready: {ready}; {[(self.tmp / h / 'gateway.log').read_text()[-2000:] for h in hosts]}"

    def get(self, host: str, path: str, token: str | None = None) -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        status, body = self.net.client(self._tls() + f"""
r = httpx.get({self.url(host) + path!r}, verify=ctx, timeout=10, headers={headers!r})
print(json.dumps([r.status_code, r.json()]))
""")  # type: ignore[misc]
        return int(status), body

    def token(self, client_id: str, secret: str) -> str:
        return str(self.net.client(self._tls() + f"""
r = httpx.post({self.url('gw1') + '/oauth/token'!r}, data={{"grant_type": "client_credentials"}},
               auth=({client_id!r}, {secret!r}), verify=ctx, timeout=30)
print(json.dumps(r.json()["access_token"]))
"""))

    def load(self, token: str, seconds: float, out: str, targets: tuple[str, ...] = ("gw1", "gw2"),
             **options: object) -> subprocess.Popen[bytes]:
        certs = self.pki / "certs"
        cmd = [sys.executable, str(LOAD), "--targets", ",".join(self.url(t) for t in targets), "--ca",
               str(certs / "ca.pem"), "--cert", str(certs / "client-demo.pem"), "--key", str(certs / "client-demo.key"),
               "--token", token, "--seconds", str(seconds), "--out", str(self.tmp / out)]
        for name, value in options.items():
            cmd += [f"--{name}", str(value)]
        return self.net.start("client", cmd, self.tmp / "load.log")

    def answers(self, out: str) -> list[dict[str, object]]:
        return [json.loads(line) for line in (self.tmp / out).read_text().splitlines()]

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill(proc)


def _statuses(answers: list[dict[str, object]]) -> Counter[object]:
    return Counter(a["status"] for a in answers)


def test_two_gateways_two_worker_hosts_and_redis_survive_losing_each(
        network: Network, pki: Path, tmp_path: Path, models_root: Path) -> None:
    hosts = Hosts(network, pki, tmp_path, models_root)
    every: list[dict[str, object]] = []
    try:
        hosts.start_all()
        secret = json.loads((pki / "credentials.json").read_text())["principals"]["demo"]["client_secret"]
        token = hosts.token("demo", secret)

        # A worker host dies under load: 200s, or 503 with Retry-After for what was on it; then the
        # other host takes everything.
        load = hosts.load(token, 8, "worker-killed.jsonl")
        time.sleep(3)
        killed_at = time.time()
        _kill(hosts.procs["wk1"], signal.SIGKILL)
        load.wait(60)
        answers = hosts.answers("worker-killed.jsonl")
        every += answers
        assert set(_statuses(answers)) <= {200, 503}, _statuses(answers)
        assert all(a["retry_after"] for a in answers if a["status"] == 503)
        late = [a for a in answers if float(a["t"]) > killed_at + 2]  # type: ignore[arg-type]
        assert late and all(a["status"] == 200 for a in late), _statuses(late)
        hosts.start_worker_host("wk1")  # back: noticed within the probe back-off
        deadline = time.monotonic() + 30
        while True:
            status, ready = hosts.get("gw1", "/v2/models/digits/ready", token)
            endpoints = ready.get("parameters", {}).get("endpoints", [])  # type: ignore[union-attr]
            if status == 200 and all(e["ready"] for e in endpoints):  # type: ignore[index]
                break
            assert time.monotonic() < deadline, ready
            time.sleep(1)

        # Redis is cut off: local limits, "degraded" in readiness, no 500; back, shared again.
        network.cut("redis", True)
        hosts.load(token, 3, "redis-cut.jsonl").wait(60)
        answers = hosts.answers("redis-cut.jsonl")
        every += answers
        assert set(_statuses(answers)) == {200}, _statuses(answers)
        for host in ("gw1", "gw2"):
            status, ready = hosts.get(host, "/v2/health/ready")
            assert status == 200 and "using local limits" in ready["degraded"]["limits"], ready  # type: ignore[index]
        network.cut("redis", False)
        time.sleep(1.5)
        hosts.load(token, 2, "redis-back.jsonl").wait(60)
        answers = hosts.answers("redis-back.jsonl")
        every += answers
        assert set(_statuses(answers)) == {200}
        for host in ("gw1", "gw2"):
            assert "degraded" not in hosts.get(host, "/v2/health/ready")[1]

        # A gateway host dies: the other serves; restarted, it serves again (its chain continues).
        _kill(hosts.procs["gw1"], signal.SIGKILL)
        hosts.load(token, 3, "gateway-killed.jsonl").wait(60)
        answers = hosts.answers("gateway-killed.jsonl")
        every += answers
        assert {a["status"] for a in answers if a["target"] == hosts.url("gw2")} == {200}
        assert {a["status"] for a in answers if a["target"] == hosts.url("gw1")} == {0}  # nobody there
        hosts.start_gateway("gw1")
        hosts.wait_ready("gw1")

        # One budget across both gateways: 10,000 rows a day for a fresh principal, 1,000 at a time.
        added = subprocess.run([sys.executable, "-m", "gateway", "clients", "add", "limited", "--roles", "inference",
                                "--config", str(tmp_path / "gw1" / "gateway.toml")],
                               capture_output=True, text=True, check=True)
        limited = hosts.token("limited", added.stdout.strip().splitlines()[-1])
        hosts.load(limited, 60, "budget.jsonl", concurrency=1, rows=1000, requests=14).wait(120)
        answers = hosts.answers("budget.jsonl")
        every += answers
        assert _statuses(answers) == Counter({200: 10, 429: 4}), _statuses(answers)
        assert {a["policy"] for a in answers if a["status"] == 429} == {"budget-rows"}
        assert {a["target"] for a in answers if a["status"] == 200} == {hosts.url("gw1"), hosts.url("gw2")}
    finally:
        hosts.stop()

    # Every answered request: exactly one audit record, on the gateway that answered it.
    records: dict[str, Counter[str]] = {}
    for host in ("gw1", "gw2"):
        records[host] = Counter()
        for path in (tmp_path / host / "audit").rglob("*"):
            if path.is_file() and path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    record = json.loads(line)
                    if record.get("kind") == "request":
                        records[host][str(record.get("request_id"))] += 1
        verified = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "--config",
                                   str(tmp_path / host / "gateway.toml")], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    answered = [a for a in every if a["status"]]
    assert len(answered) > 100
    for a in answered:
        host = "gw1" if a["target"] == hosts.url("gw1") else "gw2"
        other = "gw2" if host == "gw1" else "gw1"
        assert records[host][str(a["request_id"])] == 1 and records[other][str(a["request_id"])] == 0, a
