"""Remote workers: a real worker host (``gateway worker serve``) and a real gateway, over mutual TLS
on loopback.

The gateway serves ``digits`` only through the worker host; answers equal ONNX Runtime's. Each
side refuses the other's wrong identity: the worker host a client certificate that is not the
gateway's (or none), the gateway a worker certificate without a worker SPIFFE ID or from another
CA, logged once per endpoint. A killed worker host gives 503 with Retry-After, never a 500, and
is used again once it is back; one that answers garbage, or closes halfway through an answer, is
taken out of rotation with a 503, never a 500.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.security.pki import issue_certificate, make_ca, write_key, write_pem
from tests.conftest import Gateway, free_port, onnx_reference, start_gateway, write_config
from tests.test_metrics import value

pytestmark = pytest.mark.slow

ROW = np.arange(64, dtype=np.float32) % 16


@pytest.fixture
def pki(pki: Path, tmp_path: Path) -> Path:
    """A copy of the session's PKI: these tests issue certificates into it."""
    own = tmp_path / "pki"
    shutil.copytree(pki, own, ignore=shutil.ignore_patterns("*.log"))
    return own


def _issue(pki: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "pki", "issue", *args, "--certs", str(pki / "certs")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class WorkerHost:
    def __init__(self, pki: Path, tmp: Path, models_root: Path, cert: str, port: int | None = None,
                 digits: str = "") -> None:
        self.port = port or free_port()
        self.log = tmp / "worker-host.log"
        self.config = tmp / "worker.toml"
        self.config.write_text(f"""
[server]
runtime_dir = "{tmp / 'run'}"
pid_file = "{tmp / 'worker.pid'}"
[tls]
cert_file = "{pki}/certs/{cert}.pem"
key_file = "{pki}/certs/{cert}.key"
client_ca_file = "{pki}/certs/ca.pem"
[worker_host]
clients = ["spiffe://gateway.local/gateway"]
[supply]
trusted_keys = ["{pki}/keys/model-signing.pub"]
[models]
root = "{models_root}"
[models.digits]
listen = "127.0.0.1:{self.port}"
max_batch_size = 64
{digits}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "worker", "serve", "--config",
                                          str(self.config)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "Worker host ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker host did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture
def host(pki: Path, tmp_path: Path, models_root: Path) -> Iterator[WorkerHost]:
    _issue(pki, "worker", "host-a")
    _issue(pki, "gateway")
    h = WorkerHost(pki, tmp_path, models_root, "worker-host-a")
    h.start()
    yield h
    h.stop()


def _remote(pki: Path, port: int) -> str:
    return f'endpoints = ["127.0.0.1:{port}"]\n'


REMOTE_SECTION = """
[remote_workers]
cert_file = "{pki}/certs/gateway-client.pem"
key_file = "{pki}/certs/gateway-client.key"
"""


def _infer(gw: object, token: str) -> object:
    with gw.client(headers={"Authorization": f"Bearer {token}"}, token=False) as c:  # type: ignore[attr-defined]
        return c.post("/v2/models/digits/infer", json={"inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW.tolist()}]})


def test_a_gateway_serves_a_model_through_a_worker_host(
        pki: Path, tmp_path: Path, models_root: Path, host: WorkerHost) -> None:
    (tmp_path / "gw").mkdir()
    gw = start_gateway(pki, tmp_path / "gw", models_root, digits_workers=0, digits=_remote(pki, host.port),
                       sections=REMOTE_SECTION.format(pki=pki))
    try:
        token = gw.token("demo")
        r = _infer(gw, token)
        assert r.status_code == 200, r.text  # type: ignore[attr-defined]
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, onnx_reference(models_root, "digits", ROW[None]).reshape(-1), rtol=1e-5)
        with gw.client() as c:
            ready = c.get("/v2/models/digits/ready").json()
        assert ready["ready"] is True
        assert ready["parameters"]["endpoints"] == [{"endpoint": f"127.0.0.1:{host.port}", "ready": True, "version": "1",
                                                     "same_model": True, "providers": ["CPUExecutionProvider"]}]
        with gw.client("admin") as c:
            scrape = c.get("/metrics").text
        assert value(scrape, "gateway_worker_healthy", model="digits", worker=f"127.0.0.1:{host.port}") == 1
        assert value(scrape, "gateway_worker_model_version", model="digits", worker=f"127.0.0.1:{host.port}",
                     version="1") == 1

        # Only the gateway's identity gets through the worker host: a principal's certificate is
        # cut off after the handshake, no certificate fails it.
        demo = ssl.create_default_context(cafile=str(pki / "certs" / "ca.pem"))
        demo.check_hostname = False
        demo.load_cert_chain(pki / "certs" / "client-demo.pem", pki / "certs" / "client-demo.key")
        assert _answer(demo, host.port) == b""
        bare = ssl.create_default_context(cafile=str(pki / "certs" / "ca.pem"))
        bare.check_hostname = False
        assert _answer(bare, host.port) == b""
        time.sleep(0.3)
        refusals = host.log.read_text().count("refused a client of digits")
        assert refusals == 1, host.log.read_text()[-2000:]  # once per identity

        # The worker host goes away: 503 with Retry-After, never a 500; back, it is used again.
        host.stop()
        down = _infer(gw, token)
        assert down.status_code == 503 and down.headers["retry-after"]  # type: ignore[attr-defined]
        host.start()
        deadline = time.monotonic() + 15
        while _infer(gw, token).status_code != 200:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, gw.log.read_text()[-2000:]
            time.sleep(0.3)
    finally:
        gw.stop()


def _answer(context: ssl.SSLContext, port: int) -> bytes:
    """What a worker host answers a health request on a connection made with ``context``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /health HTTP/1.1\r\nhost: worker\r\n\r\n")
            return tls.recv(65536)
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return b""


@pytest.mark.parametrize("impostor", ["no-worker-identity", "another-ca"])
def test_a_gateway_refuses_a_worker_host_without_a_worker_identity(
        pki: Path, tmp_path: Path, models_root: Path, impostor: str) -> None:
    _issue(pki, "gateway")
    if impostor == "no-worker-identity":
        cert = "server"  # from the right CA, but a web server's certificate: no spiffe://.../worker/ URI
    else:
        other = make_ca("Another CA")
        issued = issue_certificate(other, "host-x", server=True, dns=("localhost",),
                                   uris=("spiffe://gateway.local/worker/host-x",))
        write_key(pki / "certs" / "worker-other-ca.key", issued.key)
        write_pem(pki / "certs" / "worker-other-ca.pem", issued.cert)
        cert = "worker-other-ca"
    host = WorkerHost(pki, tmp_path, models_root, cert)
    host.start()
    gw = _launch(pki, tmp_path / "gw", models_root, _remote(pki, host.port), REMOTE_SECTION.format(pki=pki))
    try:
        token = gw.token("demo")
        answers = [_infer(gw, token) for _ in range(3)]
        assert [a.status_code for a in answers] == [503] * 3  # type: ignore[attr-defined]
        with gw.client(token=False) as c:
            assert c.get("/v2/health/ready").status_code == 503
        log = gw.log.read_text()
        why = "is not a worker" if impostor == "no-worker-identity" else "not from the workers' CA"
        assert log.count(why) == 1, log[-3000:]  # logged once, though probed and asked again and again
        assert "Traceback" not in log
    finally:
        gw.stop()
        host.stop()


def _launch(pki: Path, tmp: Path, models_root: Path, digits: str, sections: str) -> Gateway:
    """A gateway that is live but may never be ready (its only worker refused)."""
    tmp.mkdir()
    port = free_port()
    config = write_config(pki, tmp, models_root, port, digits_workers=0, digits=digits, sections=sections)
    log = tmp / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(f"https://localhost:{port}", port, pki, config, proc, log)
    deadline = time.monotonic() + 60
    with gw.client(token=False) as c:
        while True:
            try:
                if c.get("/v2/health/live").status_code == 200:
                    return gw
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                gw.stop()
                raise RuntimeError(f"gateway did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)


class FakeWorkerHost:
    """A worker host with a valid worker certificate that answers its health checks and then
    ``/infer`` with garbage, or by closing the connection halfway through an answer."""

    def __init__(self, pki: Path, behaviour: str) -> None:
        self.behaviour = behaviour
        self.port = free_port()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki / "certs" / "worker-fake.pem", pki / "certs" / "worker-fake.key")
        self.context.load_verify_locations(pki / "certs" / "ca.pem")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.infers = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                await reader.readexactly(length)
                if head.startswith(b"GET /health"):
                    body = b'{"ready": true, "providers": ["CPUExecutionProvider"]}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                elif self.behaviour == "garbage":
                    self.infers += 1
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\ninference-header-content-length: 5\r\n\r\n"
                                 b"hello world")
                else:
                    self.infers += 1
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nhalf")
                    await writer.drain()
                    writer.close()
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()

    def start(self) -> None:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context), self.loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("behaviour,eject_after", [("garbage", 1), ("close", 1), ("garbage", 3)])
def test_a_worker_host_that_answers_garbage_is_ejected_without_a_500(
        pki: Path, tmp_path: Path, models_root: Path, behaviour: str, eject_after: int) -> None:
    _issue(pki, "worker", "fake")
    _issue(pki, "gateway")
    host = FakeWorkerHost(pki, behaviour)
    host.start()
    (tmp_path / "gw").mkdir()
    gw = start_gateway(pki, tmp_path / "gw", models_root, digits_workers=0, digits=_remote(pki, host.port),
                       sections=REMOTE_SECTION.format(pki=pki) + f"eject_after = {eject_after}\n")
    try:
        token = gw.token("demo")
        # One keep-alive connection: requests milliseconds apart.
        with gw.client(headers={"Authorization": f"Bearer {token}"}, token=False) as client:
            def infer() -> None:  # refused with 503, whether it reached the host or not
                answer = client.post("/v2/models/digits/infer", json={"inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW.tolist()}]})
                assert answer.status_code == 503 and answer.headers["retry-after"] and answer.json()["error"], answer.text

            # Each reaches the host (in rotation until the last of them); then it is out.
            for _ in range(eject_after):
                infer()
            assert host.infers == eject_after
            # Its health still answers ready, so the next probe (at most 0.5 s away, possibly a
            # millisecond) brings it back the first time: readiness would race that probe, and so
            # would a request; the gateway's log says when it left.
            name = f"worker digits@127.0.0.1:{host.port}"
            log = gw.log.read_text()
            assert log.count(f"{name} out of rotation") == 1, log[-2000:]
            # Back within a second, it fails again before serving anything: held out for 1 s this
            # time, however ready its health checks say it is.
            deadline = time.monotonic() + 5
            while f"{name} back in rotation" not in gw.log.read_text():
                assert time.monotonic() < deadline, gw.log.read_text()[-2000:]
                time.sleep(0.1)
            for _ in range(eject_after):
                infer()
            assert host.infers == 2 * eject_after
            log = gw.log.read_text()
            assert "held out for 1 s (ejection 2 with no request served between)" in log, log[-2000:]
            # Out of rotation for that second, whatever its probes (every 0.5 s) say: requests are
            # refused here and none reaches it.
            time.sleep(0.6)
            for _ in range(3):
                infer()
            assert host.infers == 2 * eject_after
            assert "Traceback" not in gw.log.read_text()
        with gw.client("admin") as admin:  # what an alert on outlier ejections reads
            scrape = admin.get("/metrics").text
        assert value(scrape, "gateway_worker_ejections_total", model="digits", worker=f"127.0.0.1:{host.port}") == 2
    finally:
        gw.stop()
        host.stop()


def test_worker_host_commands_refuse_mistakes_in_one_line(pki: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)

    for args, says in [
        (("pki", "issue", "worker", "../etc", "--certs", str(pki / "certs")), "needs a NAME of letters"),
        (("pki", "issue", "worker", "a", "--certs", str(tmp_path)), "ca.key is missing"),
        (("worker", "serve", "--config", str(pki / "gateway.toml")), "is not a worker host's configuration"),
    ]:
        out = run(*args)
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("identity", ["spiffe://gateway.local/", "spiffe://gateway.local/worker", "worker"])
def test_a_worker_identity_must_be_a_spiffe_path_prefix(pki: Path, tmp_path: Path, models_root: Path,
                                                        identity: str) -> None:
    from gateway.config import ConfigError, load_config

    _issue(pki, "gateway")
    config = write_config(pki, tmp_path, models_root, free_port(), digits='endpoints = ["127.0.0.1:9443"]\n',
                          sections=REMOTE_SECTION.format(pki=pki) + f'identity = "{identity}"\n')
    with pytest.raises(ConfigError, match="remote_workers.identity"):
        load_config(config)


def test_a_sealed_model_is_opened_only_on_its_worker_host(pki: Path, tmp_path: Path, models_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker host holds the model's own key-encryption key; the gateway, which serves the
    model only through it, checks the signature and holds no key at all."""
    import base64
    import os

    monkeypatch.delenv("GATEWAY_MODEL_KEK", raising=False)
    root = tmp_path / "models"
    shutil.copytree(models_root / "digits", root / "digits")
    kek = tmp_path / "digits.kek"
    kek.write_bytes(base64.b64encode(os.urandom(32)))
    (tmp_path / "cli").mkdir()
    cli = write_config(pki, tmp_path / "cli", root, free_port(), supply=f'kek_file = "{kek}"')
    sealed = subprocess.run([sys.executable, "-m", "gateway", "models", "encrypt", str(root / "digits" / "1"),
                             "--config", str(cli)], capture_output=True, text=True)
    assert sealed.returncode == 0 and not (root / "digits" / "1" / "model.onnx").exists(), sealed.stderr
    _issue(pki, "worker", "host-a")
    _issue(pki, "gateway")
    host = WorkerHost(pki, tmp_path, root, "worker-host-a", digits=f'kek_file = "{kek}"')
    host.start()
    (tmp_path / "gw").mkdir()
    shutil.copytree(models_root / "resnetish", root / "resnetish")  # served locally, as it is
    try:
        # The gateway reads the same sealed folder, without a key-encryption key.
        gw = start_gateway(pki, tmp_path / "gw", root, digits_workers=0, digits=_remote(pki, host.port),
                           sections=REMOTE_SECTION.format(pki=pki))
    except BaseException:
        host.stop()
        raise
    try:
        r = _infer(gw, gw.token("demo"))
        assert r.status_code == 200, r.text  # type: ignore[attr-defined]
        got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)  # type: ignore[attr-defined]
        np.testing.assert_allclose(got, onnx_reference(models_root, "digits", ROW[None]).reshape(-1), rtol=1e-5)
    finally:
        gw.stop()
        host.stop()
