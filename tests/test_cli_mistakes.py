"""`gateway infer` meets the mistakes a new operator makes with one line and an exit code each,
never a traceback, and without the HTTP library's request lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Gateway

pytestmark = pytest.mark.slow


@pytest.fixture
def here(gateway: Gateway, tmp_path: Path) -> Path:
    creds = json.loads((gateway.pki / "credentials.json").read_text())
    creds["gateway"], creds["token_endpoint"] = gateway.url, f"{gateway.url}/oauth/token"
    (tmp_path / "credentials.json").write_text(json.dumps(creds))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "digit.json").write_text(json.dumps([[0.0] * 64]))
    return tmp_path


CASES = [
    # (arguments, exit code, what stderr says)
    (["digits", "--input", "empty.json"], 2, "empty.json: not JSON"),
    (["digits", "--input", "missing.npy"], 2, "missing.npy: no such file"),
    (["digits", "--input", "digit.json", "--credentials", "nowhere.json"], 2, "`gateway init` writes it"),
    (["digits", "--input", "digit.json", "--principal", "dmeo"], 2, "did you mean 'demo'?"),
    (["digit", "--input", "digit.json"], 3, "did you mean 'digits'?"),
]


@pytest.mark.parametrize("arguments,code,says", CASES, ids=[c[2] for c in CASES])
def test_a_mistake_gets_one_line_and_its_exit_code(here: Path, arguments: list[str], code: int, says: str) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "infer", *arguments], capture_output=True, text=True,
                         cwd=here, timeout=60)
    assert out.returncode == code, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr and "HTTP Request" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_answer_is_json_on_standard_output(here: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "infer", "digits", "--input", "digit.json"],
                         capture_output=True, text=True, cwd=here, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert json.loads(out.stdout)["probabilities"]["shape"] == [1, 10]


def test_gateway_config_is_honoured_and_global_options_go_anywhere(pki: Path, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "GATEWAY_CONFIG": str(pki / "gateway.toml")}
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "--log-level", "warning"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=60)  # no gateway.toml here
    assert out.returncode == 0 and f"{pki / 'gateway.toml'}: valid" in out.stdout, out.stderr
    missing = subprocess.run([sys.executable, "-m", "gateway", "check"], capture_output=True, text=True, cwd=tmp_path,
                             env={k: v for k, v in env.items() if k != "GATEWAY_CONFIG"}, timeout=60)
    assert missing.returncode == 2 and "gateway.toml: no such file" in missing.stderr
