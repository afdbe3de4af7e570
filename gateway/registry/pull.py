"""``gateway models pull``: copy signed model versions from a delivery volume into the serving
model root, verified on the copy before they become visible.

The init container of the Kubernetes manifests runs it before the gateway starts: a version
enters ``models.root`` only as a whole, only with a signature by one of ``supply.trusted_keys``
over the bytes that were copied (not over the source, which could change in between), and never
over a different version of the same number (versions are immutable: publish a new one).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.registry.manifest import load_manifest
from gateway.registry.signing import SIGNATURE_NAME, verify_model

__all__ = ["PullError", "PullResult", "pull_models"]


class PullError(ValueError):
    """A version that cannot be delivered: unsigned, badly signed, unsafe or conflicting."""


@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    outcome: str
    """``pulled``, ``present`` (already there, byte for byte) or ``refused: <reason>``."""


def _versions(source: Path) -> Iterator[Path]:
    """``<source>/<name>/<version>`` folders (those holding a manifest)."""
    for model in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in sorted(p for p in model.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (version / "manifest.json").is_file():
                yield version


def _copy_regular_files(src: Path, dst: Path) -> None:
    """Copy a version folder's regular files; a link or a device in it is refused (a link could
    point at anything on the delivery volume's host)."""
    for entry in src.rglob("*"):
        mode = entry.lstat().st_mode
        target = dst / entry.relative_to(src)
        if stat.S_ISDIR(mode):
            target.mkdir(mode=0o755)
        elif stat.S_ISREG(mode):
            shutil.copyfile(entry, target, follow_symlinks=False)
            os.chmod(target, 0o644)
        else:
            raise PullError(f"{entry} is not a regular file or folder")


def _same(a: Path, b: Path) -> bool:
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    if files != {p.relative_to(b) for p in b.rglob("*") if p.is_file()}:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def _pull_one(folder: Path, root: Path, trusted_keys: list[Path]) -> PullResult:
    manifest = load_manifest(folder)
    name, version = manifest.name, manifest.version
    if (folder.parent.name, folder.name) != (name, version):
        raise PullError(f"{folder}: its manifest says {name}/{version}")
    if not (folder / SIGNATURE_NAME).is_file():
        raise PullError(f"{name}/{version}: unsigned ({SIGNATURE_NAME} missing)")
    final = root / name / version
    (root / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.pulling-", dir=root / name))
    try:
        _copy_regular_files(folder, staging)
        verify_model(staging, trusted_keys)  # what was copied is what is checked
        load_manifest(staging)
        if final.exists():
            if _same(staging, final):
                return PullResult(name, version, "present")
            raise PullError(f"{name}/{version}: a different version {version} is already in {root} "
                            "(versions are immutable: publish a new version number)")
        os.chmod(staging, 0o755)
        os.rename(staging, final)  # the whole version appears at once
        return PullResult(name, version, "pulled")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pull_models(source: Path, root: Path, trusted_keys: list[Path],
                progress: Callable[[PullResult], None] = lambda _: None) -> list[PullResult]:
    """Deliver every version under ``source`` into ``root``; a refused version is reported and
    left out, the others still delivered."""
    if not source.is_dir():
        raise PullError(f"{source} is not a folder")
    if not trusted_keys:
        raise PullError("no trusted keys are configured (supply.trusted_keys): nothing can be verified")
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for folder in _versions(source):
        try:
            result = _pull_one(folder, root, trusted_keys)
        except (PullError, ValueError, OSError) as exc:
            result = PullResult(folder.parent.name, folder.name, f"refused: {exc}")
        progress(result)
        results.append(result)
    return results
