"""`gateway pki export`: what a serving container may hold, owned by the image's users; never the
CA key, the model-signing key or client credentials."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main

FORBIDDEN = {"ca.key", "model-signing.key", "credentials.json", "client-demo.key", "client-admin.key"}


@pytest.fixture()
def init(pki: Path, tmp_path: Path, models_root: Path) -> Path:
    import re

    copy = tmp_path / "init"
    shutil.copytree(pki, copy, ignore=shutil.ignore_patterns("audit", "*.pid"))
    config = copy / "gateway.toml"  # its models root, relative to the original folder, made absolute
    config.write_text(re.sub(r'^root = "[^"]*"', f'root = "{models_root}"', config.read_text(), flags=re.M))
    assert main(["pki", "issue", "worker", "pod", "--certs", str(copy / "certs")]) == 0
    assert main(["pki", "issue", "gateway", "--certs", str(copy / "certs")]) == 0
    return copy


def test_export_copies_the_serving_files_to_their_owners(init: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving"
    assert main(["pki", "export", "--from", str(init), "--to", str(out), "--worker", "pod",
                 "--owner", "10001:10001", "--worker-owner", "10002:10002"]) == 0
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert {"certs/server.pem", "certs/server.key", "certs/ca.pem", "certs/gateway-client.key",
            "keys/audit-signing.key", "keys/model-signing.pub", "worker-certs/worker.key", "gateway.toml"} <= set(files)
    assert not {Path(f).name for f in files} & FORBIDDEN
    for name, path in files.items():
        info = path.stat()
        owner = 10002 if name.startswith("worker-certs/") else 10001
        assert info.st_uid == owner, name
        if name.endswith((".key", ".json")):
            assert stat.S_IMODE(info.st_mode) == 0o600, name
    for folder in ("certs", "keys", "issuer", "audit", "worker-certs"):
        assert stat.S_IMODE((out / folder).stat().st_mode) == 0o700
    assert (out / "certs" / "server.key").read_bytes() == (init / "certs" / "server.key").read_bytes()


def test_export_says_what_is_missing(tmp_path: Path, init: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "export", "--from", str(tmp_path / "empty"), "--to", str(tmp_path / "o")]) == 2
    assert "run `gateway init" in capsys.readouterr().err
    assert main(["pki", "export", "--from", str(init), "--to", str(tmp_path / "o"), "--worker", "gpu-9"]) == 2
    assert "gateway pki issue worker gpu-9" in capsys.readouterr().err


def test_kube_files_fills_the_overlays_host_folder(init: Path, tmp_path: Path) -> None:
    """deploy/dev/kube-files: the serving files, the signing public key alone, and the signed models."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "srv"
    done = subprocess.run([str(root / "deploy/dev/kube-files"), str(init), str(out)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GATEWAY": str(Path(sys.executable).parent / "gateway")},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "trust").iterdir()) == ["model-signing.pub"]
    assert sorted(p.name for p in (out / "delivery").iterdir()) == ["digits", "resnetish"]
    assert (out / "delivery" / "digits" / "1" / "model.sig").is_file()
    assert not {p.name for p in out.rglob("*")} & FORBIDDEN
