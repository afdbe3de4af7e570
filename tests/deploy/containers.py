"""Helpers for the container tests: podman, the images, and a serving folder made the way an
operator makes one (``gateway init``, then ``deploy/dev/kube-files``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = str(Path(sys.executable).parent / "gateway")
IMAGE = "localhost/gateway:cpu"

PROCESSES = """
import json, os
out = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
        status = dict(l.split(':', 1) for l in open(f'/proc/{pid}/status'))
    except OSError:
        continue
    out.append({'pid': int(pid), 'argv': [a.decode() for a in argv if a], 'uid': int(status['Uid'].split()[0]),
                'gid': int(status['Gid'].split()[0]), 'cap_eff': status['CapEff'].strip(),
                'groups': status['Groups'].split()})
print(json.dumps(out))
"""


def podman_unusable() -> str:
    """Why the container tests cannot run here ("" when they can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (make containers, as root)"
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    out = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"podman does not work here: {out.stderr.strip()[:200]}"
    return ""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def make(target: str, log: Path) -> None:
    """A Makefile target (the images), its output kept in ``log``; a failure shows its tail."""
    with open(log, "w") as out:
        done = subprocess.run(["make", "-C", str(ROOT), target], stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    assert done.returncode == 0, log.read_text()[-4000:]


def processes(container: str) -> list[dict[str, object]]:
    return list(json.loads(podman("exec", container, "python", "-c", PROCESSES).stdout))


def serving_folder(base: Path, models: Path, port: int) -> tuple[Path, Path]:
    """``gateway init`` over a copy of the demo models (signed and calibrated by it), then the
    serving folder ``deploy/dev/kube-files`` makes of it. Returns (init folder, serving folder)."""
    repo = base / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models / name, repo / name, ignore=shutil.ignore_patterns("model.sig", "calibration.json"))
    shutil.copytree(models / "_data", repo / "_data")
    init = base / "init"
    subprocess.run([GATEWAY, "init", "--dir", str(init), "--models", str(repo), "--port", str(port)],
                   check=True, capture_output=True, timeout=600)
    out = base / "serving"
    subprocess.run([str(ROOT / "deploy/dev/kube-files"), str(init), str(out)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "GATEWAY": GATEWAY})
    return init, out


def credentials_for(init: Path, port: int) -> Path:
    """``init``'s credentials file, pointed at a gateway published on ``port``."""
    data = json.loads((init / "credentials.json").read_text())
    old = data["gateway"]
    new = f"https://localhost:{port}"
    data["gateway"], data["token_endpoint"] = new, data["token_endpoint"].replace(old, new)
    path = init / f"credentials-{port}.json"
    path.write_text(json.dumps(data))
    return path


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, TLS not ready...
            pass
        time.sleep(1)
    raise AssertionError(f"{what} not ready after {timeout_s:.0f}s:\n{logs()[-4000:]}")
