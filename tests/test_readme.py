"""The README's examples run: the Quickstart's curl commands, the tritonclient program and the SDK
program, against a running gateway, from a folder laid out as `gateway init` leaves it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(after: str, language: str) -> str:
    """The first ``language`` block of the README after the text ``after``."""
    start = README.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no {language} block after {after!r}"
    return match.group(1)


@pytest.fixture
def folder(gateway: Gateway, tmp_path: Path) -> Path:
    """certs/ and credentials.json where the examples expect them, pointed at this gateway."""
    (tmp_path / "certs").symlink_to(gateway.pki / "certs")
    creds = json.loads((gateway.pki / "credentials.json").read_text())
    creds["gateway"], creds["token_endpoint"] = gateway.url, f"{gateway.url}/oauth/token"
    (tmp_path / "credentials.json").write_text(json.dumps(creds))
    return tmp_path


def _here(text: str, gateway: Gateway) -> str:
    return text.replace("localhost:8443", f"localhost:{gateway.port}")


def test_the_quickstart_curl_commands(gateway: Gateway, folder: Path) -> None:
    script = _here(_block("prints how to call it", "sh"), gateway)
    digit = [0, 0, 5, 13, 9, 1, 0, 0] + [8] * 56
    assert "0,0,5,13,9,1,0,0, ... 64 values" in script  # the one elision the README makes
    script = script.replace("0,0,5,13,9,1,0,0, ... 64 values", ",".join(map(str, digit)))
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=folder,
                         timeout=120, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"models"' in out.stdout and '"digits"' in out.stdout
    assert "HTTP/1.1 200" in out.stdout or "HTTP/2 200" in out.stdout
    assert '"probabilities"' in out.stdout


@pytest.mark.parametrize("after", ["With `tritonclient`", "## Python SDK"], ids=["tritonclient", "sdk"])
def test_the_python_examples(gateway: Gateway, folder: Path, after: str) -> None:
    program = _here(_block(after, "python"), gateway)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=folder, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^\d$", out.stdout, re.M), out.stdout  # a digit's class was printed
