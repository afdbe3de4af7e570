"""The cpu image built from the Debian-made base and run as an operator would: read-only, with a
`gateway init` folder mounted (owned by the image's user, no CA key), serving an inference over
mTLS with a token to a client outside; its workers as users of their own that cannot read the
gateway's keys. And the single-node overlay played with `podman kube play`, serving the same.
Skipped where podman cannot run (not root, or not installed: `make containers`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway_client import Client
from tests.conftest import free_port, onnx_reference
from tests.deploy.containers import (
    IMAGE,
    ROOT,
    credentials_for,
    make,
    podman,
    podman_unusable,
    processes,
    serving_folder,
    wait_for,
)

# Skipped where podman cannot run (the reason says why), but never in CI: there `make test` runs
# as root and sets podman up, so a podman that does not work is a failure.
UNUSABLE = podman_unusable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(UNUSABLE) and not os.environ.get("CI"), reason=UNUSABLE)]

GATEWAY_UID = 10001
WORKER_GROUP = 10002


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    make("image", tmp_path_factory.mktemp("build") / "image.log")
    return IMAGE


def _digit(models_root: Path) -> np.ndarray:
    return np.load(models_root / "_data" / "digits-calibration.npy")[:3].astype(np.float32)


@pytest.fixture(scope="module")
def container(image: str, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[str, Path, Path]]:
    port = free_port()
    init, serving = serving_folder(tmp_path_factory.mktemp("container"), models_root, port)
    name = f"gateway-test-{port}"
    podman("run", "-d", "--name", name, "--read-only", "--cap-drop", "ALL", "--cap-add", "SETUID,SETGID",
           "-p", f"127.0.0.1:{port}:{port}",
           "-v", f"{serving / 'gateway.toml'}:/etc/gateway/gateway.toml:ro",
           "-v", f"{serving / 'certs'}:/etc/gateway/certs:ro",
           "-v", f"{serving / 'keys'}:/etc/gateway/keys:ro",
           "-v", f"{serving / 'issuer'}:/etc/gateway/issuer",
           "-v", f"{serving / 'audit'}:/var/lib/gateway/audit",
           "-v", f"{serving / 'delivery'}:/models:ro", image)
    credentials = credentials_for(init, port)
    try:
        with Client.from_credentials(credentials, "demo") as client:
            wait_for(client.ready, 180, "the gateway container", lambda: podman("logs", name, check=False).stderr)
        yield name, credentials, serving
    finally:
        podman("stop", "-t", "20", name, check=False)
        podman("rm", "-f", name, check=False)


def test_the_container_serves_an_inference_over_mtls_with_a_token(container: tuple[str, Path, Path],
                                                                 models_root: Path) -> None:
    name, credentials, _ = container
    x = _digit(models_root)
    with Client.from_credentials(credentials, "demo") as client:
        assert client.ready()
        out = client.infer("digits", x)
    np.testing.assert_allclose(next(iter(out.values())), onnx_reference(models_root, "digits", x), atol=1e-5)
    assert podman("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK


def test_workers_run_as_their_own_users_and_cannot_read_the_keys(container: tuple[str, Path, Path]) -> None:
    name, _, _ = container
    procs = processes(name)
    gateway = [p for p in procs if "serve" in p["argv"] and any(str(a).endswith("gateway") for a in p["argv"])]
    workers = [p for p in procs if "gateway.workers.worker" in p["argv"]]
    assert gateway and len(workers) == 2, procs
    assert all(p["uid"] == GATEWAY_UID and int(str(p["cap_eff"]), 16) == 0 for p in gateway), gateway
    uids = {p["uid"] for p in workers}
    assert len(uids) == 2 and GATEWAY_UID not in uids and all(p["gid"] == WORKER_GROUP for p in workers), workers
    assert all(int(str(p["cap_eff"]), 16) == 0 and p["groups"] == [] for p in workers), workers
    for uid in uids:
        for secret in ("/etc/gateway/certs/server.key", "/etc/gateway/keys/audit-signing.key",
                       "/etc/gateway/issuer/keys.json"):
            read = podman("exec", "--user", f"{uid}:{WORKER_GROUP}", name, "cat", secret, check=False)
            assert read.returncode != 0 and "Permission denied" in read.stderr, (uid, secret, read)
    assert podman("exec", name, "cat", "/etc/gateway/certs/server.key", check=False).returncode == 0  # the gateway can
    wrote = podman("exec", name, "touch", "/opt/venv/x", check=False)
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr


def test_the_serving_folder_and_the_image_hold_no_signing_or_ca_key(image: str, container: tuple[str, Path, Path]) -> None:
    _, _, serving = container
    names = {p.name for p in serving.rglob("*")}
    assert not names & {"ca.key", "model-signing.key", "credentials.json", "client-demo.key", "client-admin.key"}
    assert all(p.stat().st_uid == GATEWAY_UID for p in (serving / "certs").iterdir())
    assert all(p.stat().st_uid == WORKER_GROUP for p in (serving / "worker-certs").iterdir())
    found = podman("run", "--rm", "--entrypoint", "python", image, "-c",
                   "import os, re\n"
                   "for top, dirs, files in os.walk('/'):\n"
                   "    dirs[:] = [d for d in dirs if os.path.join(top, d) not in ('/proc', '/sys', '/dev')]\n"
                   "    for f in files:\n"
                   "        p = os.path.join(top, f)\n"
                   "        if re.search(r'\\.(key|pem|p12|jwk)$', f) or f in ('credentials.json',):\n"
                   "            try: data = open(p, 'rb').read(1 << 20)\n"
                   "            except OSError: continue\n"
                   "            if b'PRIVATE KEY' in data or b'\"d\"' in data: print(p)\n")
    assert found.stdout.strip() == "", found.stdout


def test_the_sbom_lists_what_the_image_runs(image: str) -> None:
    sbom = json.loads(podman("run", "--rm", "--entrypoint", "cat", image, "/usr/share/gateway/sbom.cdx.json").stdout)
    assert sbom["bomFormat"] == "CycloneDX"
    versions = {c["name"].lower(): c["version"] for c in sbom["components"]}
    lock = (ROOT / "requirements-runtime-cpu.lock").read_text()
    for dist in ("onnxruntime", "cryptography", "starlette", "authlib"):
        pinned = re.search(rf"^{dist}==(\S+)", lock, re.M | re.I)
        assert pinned and versions.get(dist) == pinned.group(1), (dist, versions.get(dist))


def test_a_stopped_container_leaves_a_complete_audit_log(container: tuple[str, Path, Path], image: str) -> None:
    """Last in the module's order of use: stop the container, then verify its audit log."""
    name, _, serving = container
    podman("stop", "-t", "20", name)
    keys = serving / "keys"
    out = podman("run", "--rm", "--entrypoint", "gateway", "-v", f"{serving / 'audit'}:/audit:ro",
                 "-v", f"{keys}:/keys:ro", image, "audit", "verify", "--public-key", "/keys/audit-signing.pub", "/audit",
                 check=False)
    assert out.returncode == 0, out.stdout + out.stderr


KUBE_VOLUMES = ("gateway-models", "gateway-run", "gateway-tmp", "gateway-worker-run", "gateway-worker-tmp",
                "gateway-redis-data", "gateway-config")


@pytest.fixture(scope="module")
def played(image: str, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[tuple[Path, Path]]:
    """The single-node overlay, rendered by deploy/dev/kube-render and played with podman."""
    import subprocess

    base = tmp_path_factory.mktemp("kube")
    make("redis-image", base / "redis-image.log")
    port = free_port()
    init, serving = serving_folder(base, models_root, 8443)
    manifest = base / "single-node.yaml"
    manifest.write_text(subprocess.run([str(ROOT / "deploy/dev/kube-render"), str(serving), str(port)],
                                       capture_output=True, text=True, check=True, timeout=120).stdout)
    podman("volume", "rm", "-f", *KUBE_VOLUMES, check=False)
    podman("kube", "play", "--replace", str(manifest), timeout=300)
    credentials = credentials_for(init, port)
    try:
        with Client.from_credentials(credentials, "demo") as client:
            wait_for(client.ready, 180, "the single-node pod",
                     lambda: "\n".join(podman("logs", f"gateway-pod-0-{c}", check=False).stderr[-1500:]
                                       for c in ("models-pull", "gateway", "worker", "redis")))
        yield credentials, serving
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=120)
        podman("volume", "rm", "-f", *KUBE_VOLUMES, check=False)


def test_the_single_node_pod_serves_the_same_inference(played: tuple[Path, Path], models_root: Path) -> None:
    credentials, _ = played
    x = _digit(models_root)
    with Client.from_credentials(credentials, "demo") as client:
        out = client.infer("digits", x)
        ready = client.request("GET", "/v2/models/digits/ready").json()
    np.testing.assert_allclose(next(iter(out.values())), onnx_reference(models_root, "digits", x), atol=1e-5)
    (endpoint,) = ready["parameters"]["endpoints"]  # served by the worker container, same model bytes
    assert endpoint["ready"] and endpoint["same_model"], endpoint


def test_the_played_pods_workers_run_as_their_own_user(played: tuple[Path, Path]) -> None:
    worker_side = processes("gateway-pod-0-worker")
    workers = [p for p in worker_side if "gateway.workers.worker" in p["argv"]]
    assert len(workers) == 2 and {p["uid"] for p in worker_side} == {WORKER_GROUP}, worker_side
    gateway_side = processes("gateway-pod-0-gateway")
    assert {p["uid"] for p in gateway_side} == {GATEWAY_UID}
    assert not [p for p in gateway_side if "gateway.workers.worker" in p["argv"]]
    # the worker container has no gateway key to read: none is mounted there
    for secret in ("/etc/gateway/certs/server.key", "/etc/gateway/keys/audit-signing.key"):
        assert podman("exec", "gateway-pod-0-worker", "cat", secret, check=False).returncode != 0
