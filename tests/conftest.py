"""Shared fixtures: the demo models, a development PKI, and real gateway processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.devsetup import init
from gateway.security.issuer import totp_now

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _write_art_config() -> None:
    """The Adversarial Robustness Toolbox (the security benchmark's, imported by its tests) writes
    ``~/.art/config.json`` on its first import, and two test processes importing it at once race:
    one that sees the file appear between its two checks never defines its configuration
    (``NameError: _config``). Write the file first, atomically, where ART looks for it."""
    home = Path.home()
    folder = (home if os.access(home, os.W_OK) else Path("/tmp")) / ".art"
    path = folder / "config.json"
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".config.json.{os.getpid()}"
    temporary.write_text(json.dumps({"ART_DATA_PATH": str(folder / "data")}, indent=4))
    os.replace(temporary, path)


_write_art_config()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session copy of the demo models (the session's keys sign it, and the session's ``gateway
    init`` calibrates it from the held-out data; the repository stays as it is)."""
    missing = [m for m in ("digits", "resnetish") if not (MODELS / m / "1" / "model.onnx").exists()
               or not (MODELS / "_data" / f"{m}-calibration.npy").exists()]
    if missing:
        subprocess.run([sys.executable, str(MODELS / "build.py")], check=True)
    root = tmp_path_factory.mktemp("models")
    for name in ("digits", "resnetish"):
        shutil.copytree(MODELS / name, root / name, ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
    shutil.copytree(MODELS / "_data", root / "_data")
    # Calibrated and signed once, with the key the session's PKI will trust (see ``pki``), before
    # any test's own ``gateway init`` could calibrate them and sign them with a throwaway key.
    init(root.parent / f"{root.name}-setup", root)
    return root


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Path:
    directory = tmp_path_factory.mktemp("setup")
    shutil.copytree(models_root.parent / f"{models_root.name}-setup" / "keys", directory / "keys")
    init(directory, models_root)
    return directory


def client_context(pki: Path, principal: str | None = "demo") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "certs" / "ca.pem"))
    if principal:
        ctx.load_cert_chain(pki / "certs" / f"client-{principal}.pem", pki / "certs" / f"client-{principal}.key")
    return ctx


def credentials(pki: Path) -> dict[str, Any]:
    return dict(json.loads((pki / "credentials.json").read_text())["principals"])


def fetch_token(url: str, pki: Path, principal: str = "demo", mfa: bool = True, totp_at: float | None = None) -> str:
    """Client credentials for the service "demo"; password (+ TOTP when ``mfa``, the code of the
    time ``totp_at`` or now) for the person "admin"."""
    creds = credentials(pki)[principal]
    with httpx.Client(base_url=url, verify=client_context(pki, principal), timeout=30) as c:
        if "client_secret" in creds:
            r = c.post("/oauth/token", data={"grant_type": "client_credentials"},
                       auth=(creds["client_id"], creds["client_secret"]))
        else:
            form = {"grant_type": "password", "client_id": "gateway-cli", "username": creds["username"],
                    "password": creds["password"]}
            if mfa:
                form["totp"] = totp_now(creds["totp_secret"], totp_at)
            r = c.post("/oauth/token", data=form)
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


def model_version(folder: Path, graph: Any, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                  signing_key: Path | None = None, **manifest: Any) -> bytes:
    """A model version folder (``<root>/<name>/<version>``) for ``graph`` (an ONNX ``GraphProto``,
    opset 17): its ``model.onnx`` and a ``manifest.json`` declaring ``inputs`` and ``outputs`` (and
    ``manifest``'s other fields), signed with ``signing_key`` when given. Returns the model's bytes."""
    from onnx import helper

    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({
        "name": folder.parent.name, "version": folder.name, "device": "auto", "inputs": inputs, "outputs": outputs,
        "onnx": {"file": "model.onnx", "sha256": hashlib.sha256(data).hexdigest()}, **manifest}))
    if signing_key is not None:
        from gateway.registry.signing import sign_model

        sign_model(folder, signing_key)
    return data


def onnx_reference(models_root: Path, name: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(models_root / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


@dataclass
class Gateway:
    url: str
    port: int
    pki: Path
    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, principal: str = "demo", mfa: bool = True) -> str:
        """A bearer token from the gateway's built-in issuer, fetched once per principal and kind."""
        key = f"{principal}:{mfa}"
        if key not in self.tokens:
            self.tokens[key] = fetch_token(self.url, self.pki, principal, mfa)
        return self.tokens[key]

    def auth(self, principal: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(principal)}"} if principal else {}

    def client(self, principal: str | None = "demo", token: bool = True, **kwargs: Any) -> httpx.Client:
        headers = {**(self.auth(principal) if token else {}), **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, verify=client_context(self.pki, principal), timeout=30,
                            headers=headers, **kwargs)

    def async_client(self, principal: str | None = "demo", token: bool = True, **kwargs: Any) -> httpx.AsyncClient:
        headers = {**(self.auth(principal) if token else {}), **kwargs.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.url, verify=client_context(self.pki, principal),
                                 timeout=kwargs.pop("timeout", 30), headers=headers, **kwargs)

    def runtime_dir(self) -> Path:
        for line in self.config.read_text().splitlines():
            if line.startswith("runtime_dir"):
                return Path(line.split("=", 1)[1].strip().strip('"'))
        raise AssertionError("no runtime_dir")

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record of this gateway's audit log so far (a torn last line skipped)."""
        from gateway.audit.chain import stream_files

        out = []
        for files in stream_files([self.config.parent / "audit"]).values():
            for f in files:
                for line in f.read_bytes().splitlines():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass  # a torn last line after kill -9
        return out

    def record_of(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The audit record of one request (waiting briefly for records written after the answer);
        the security events it raised are records of their own kind, beside it."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [r for r in self.audit_records() if r.get("request_id") == request_id and r["kind"] == "request"]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, f"{len(found)} records for request {request_id}"
                return found[0]
            time.sleep(0.1)

    def routes(self) -> dict[str, Any]:
        """The supervisor's routes.json: which workers (socket, pid, uid) serve which unit."""
        return dict(json.loads((self.runtime_dir() / "routes.json").read_text())["models"])

    def worker_pids(self, model: str) -> list[int]:
        """The live worker processes of a unit, as the supervisor last published them."""
        return [int(w["pid"]) for w in self.routes()[model]["workers"] if Path(f"/proc/{w['pid']}").exists()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


AUTH_POLICY = """
[[rbac.rules]]
name = "inference"
roles = ["inference"]
verbs = ["infer", "metadata", "list", "explain"]

[[rbac.rules]]
name = "admin"
roles = ["admin"]
verbs = ["*"]

[[rbac.rules]]
name = "tenant-a"
roles = ["tenant-a"]
verbs = ["infer", "metadata", "list"]
models = ["digits"]

[[rbac.rules]]
name = "tenant-b"
roles = ["tenant-b"]
verbs = ["infer", "metadata", "list"]
models = ["resnetish"]

[[rbac.step_up]]
name = "admin-mfa"
verbs = ["admin:*"]
amr_any = ["mfa", "otp", "hwk"]
"""


# The suite's load tests send thousands of requests from one principal and address; the limit
# tests start their own gateways with small limits.
TEST_LIMITS = """
per_address = "1000000/minute"
per_principal = "1000000/minute"
failed_auth_per_address = "100000/minute"
budget_inferences = ""
budget_rows = ""
per_principal_explain = ""
"""


def write_config(
    pki: Path, tmp: Path, models_root: Path, port: int, extra: str = "", digits_workers: int = 1,
    timeout_s: float = 20.0, digits_device: str = "auto", auth: str = "", sections: str = "", limits: str = "",
    issuer_url: str = "", audit: str = "", supply: str = "", max_body: int = 8 * 1024 * 1024,
    runtime: Path | None = None, tls: str = "", digits: str = "",
) -> Path:
    """A test configuration: both demo models, the session's PKI, a private runtime directory;
    ``digits`` goes into its model's table."""
    config = tmp / "gateway.toml"
    config.write_text(f"""
[server]
port = {port}
runtime_dir = "{runtime or tmp / "run"}"
request_timeout_s = {timeout_s}
max_body_bytes = {max_body}
{extra}
[tls]
cert_file = "{pki}/certs/server.pem"
key_file = "{pki}/certs/server.key"
client_ca_file = "{pki}/certs/ca.pem"
{tls}

[auth]
audience = "{issuer_url or f'https://localhost:{port}'}"
{auth}

[issuer]
url = "{issuer_url or f'https://localhost:{port}'}"
directory = "{pki}/issuer"
incidents_file = "{tmp}/incidents.json"

{AUTH_POLICY if 'rbac.rules' not in sections else ''}
[limits]
{limits or TEST_LIMITS}

[supply]
trusted_keys = ["{pki}/keys/model-signing.pub"]
signing_key = "{pki}/keys/model-signing.key"
{supply}

[audit]
directory = "{tmp}/audit"
signing_key = "{pki}/keys/audit-signing.key"
public_key = "{pki}/keys/audit-signing.pub"
flush_window_ms = 1.0
{audit}

[models]
root = "{models_root}"

[models.digits]
workers = {digits_workers}
max_batch_size = 64
device = "{digits_device}"
{digits}

[models.resnetish]
workers = 1
max_batch_size = 8
intra_op_threads = 1
{sections}
""")
    return config


def start_gateway(
    pki: Path, tmp: Path, models_root: Path, extra: str = "", digits_workers: int = 1, timeout_s: float = 20.0,
    auth: str = "", sections: str = "", limits: str = "", issuer_url: str = "", audit: str = "", supply: str = "",
    max_body: int = 8 * 1024 * 1024, preexec: Any = None, runtime: Path | None = None, tls: str = "",
    digits: str = "",
) -> Gateway:
    port = free_port()
    config = write_config(pki, tmp, models_root, port, extra, digits_workers, timeout_s, auth=auth, sections=sections,
                          limits=limits, issuer_url=issuer_url, audit=audit, supply=supply, max_body=max_body,
                          runtime=runtime, tls=tls, digits=digits)
    log = tmp / "gateway.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec)
    gw = Gateway(f"https://localhost:{port}", port, pki, config, proc, log)
    deadline = time.monotonic() + 90
    with gw.client(token=False) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {log.read_text()[-3000:]}")
            try:
                if c.get("/v2/health/ready").status_code == 200:
                    return gw
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway not ready: {log.read_text()[-3000:]}")


def credentials_for(gw: Gateway, tmp: Path) -> Path:
    """The gateway's credentials.json, pointed at this gateway's port."""
    data = json.loads((gw.pki / "credentials.json").read_text())
    data["gateway"] = gw.url
    data["token_endpoint"] = f"{gw.url}/oauth/token"
    path = tmp / "credentials.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def gateway(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw"), models_root)
    yield gw
    gw.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

