"""What a serving container may hold, copied out of a ``gateway init`` folder with the owners and
modes a container's users need (``gateway pki export``).

A container never gets the CA's key, the model-signing key, the demo clients' keys or the
credentials file: those stay where certificates are issued and models are signed. The gateway's
files go to the gateway's user, readable by it alone; a worker host's certificate and key go to
the workers' user, so that neither can read the other's.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExportError", "Owner", "export_serving_files"]

GATEWAY_FILES = {
    "certs": ("server.pem", "server.key", "ca.pem", "gateway-client.pem", "gateway-client.key"),
    "keys": ("audit-signing.key", "audit-signing.pub", "model-signing.pub"),
}
"""Per folder, the files a gateway container may get (those present are copied)."""
REQUIRED = ("certs/server.pem", "certs/server.key", "certs/ca.pem", "keys/audit-signing.key", "keys/audit-signing.pub")
NEVER = ("ca.key", "model-signing.key", "credentials.json")


class ExportError(ValueError):
    """The init folder lacks what a serving container needs."""


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


@dataclass
class Exported:
    files: list[Path] = field(default_factory=list)


def _place(source: Path, target: Path, owner: Owner, mode: int, done: Exported) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp, follow_symlinks=False)
    os.chown(tmp, owner.uid, owner.gid)
    os.chmod(tmp, mode)
    os.replace(tmp, target)
    done.files.append(target)


def _folder(path: Path, owner: Owner, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, owner.uid, owner.gid)
    os.chmod(path, mode)
    return path


def _secret(name: str) -> bool:
    return name.endswith(".key") or name.endswith(".json")


def export_serving_files(init_dir: Path, out: Path, gateway: Owner, worker: Owner | None = None,
                         worker_name: str = "") -> list[Path]:
    """Copy the serving subset of ``init_dir`` into ``out``: ``certs/``, ``keys/``, ``issuer/``,
    an empty ``audit/`` and the configuration for the gateway's user; with ``worker_name``,
    ``worker-certs/`` (worker.pem, worker.key, ca.pem) for the workers' user."""
    missing = [r for r in REQUIRED if not (init_dir / r).is_file()]
    if missing:
        raise ExportError(f"{init_dir} lacks {', '.join(missing)}: run `gateway init --dir {init_dir}` first")
    done = Exported()
    _folder(out, Owner(os.getuid(), os.getgid()), 0o755)
    for folder, names in GATEWAY_FILES.items():
        target = _folder(out / folder, gateway)
        for name in names:
            if (init_dir / folder / name).is_file():
                _place(init_dir / folder / name, target / name, gateway, 0o600 if _secret(name) else 0o644, done)
    issuer = _folder(out / "issuer", gateway)
    for entry in sorted((init_dir / "issuer").glob("*.json")) if (init_dir / "issuer").is_dir() else []:
        _place(entry, issuer / entry.name, gateway, 0o600, done)
    _folder(out / "audit", gateway)
    if (init_dir / "gateway.toml").is_file():
        _place(init_dir / "gateway.toml", out / "gateway.toml", gateway, 0o644, done)
    if worker_name:
        stem = init_dir / "certs" / f"worker-{worker_name}"
        if not (stem.with_suffix(".pem").is_file() and stem.with_suffix(".key").is_file()):
            raise ExportError(f"{stem}.pem/.key missing: `gateway pki issue worker {worker_name} "
                              f"--certs {init_dir / 'certs'}` first")
        owner = worker or gateway
        target = _folder(out / "worker-certs", owner)
        _place(stem.with_suffix(".pem"), target / "worker.pem", owner, 0o644, done)
        _place(stem.with_suffix(".key"), target / "worker.key", owner, 0o600, done)
        _place(init_dir / "certs" / "ca.pem", target / "ca.pem", owner, 0o644, done)
    leaked = [p for p in done.files if p.name in NEVER]
    assert not leaked, leaked  # the lists above never name them
    return done.files
