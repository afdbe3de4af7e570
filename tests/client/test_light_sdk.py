"""The SDK's own distribution (clients/python, ``gateway-client``), installed alone into a fresh
virtual environment, against a live gateway: it needs nothing of the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.client.test_sdk import credentials_for
from tests.conftest import Gateway, onnx_reference

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import numpy as np
from gateway_client import Client, NotFound

creds, rows = sys.argv[1], np.array(json.loads(sys.argv[2]), np.float32)
answer = {"modules": []}
with Client.from_credentials(creds, "demo") as client:
    answer["ready"] = client.ready()
    answer["models"] = sorted(m["name"] for m in client.models())
    answer["binary"] = client.infer("digits", rows)["probabilities"].tolist()
    answer["json"] = client.infer("digits", rows, binary=False)["probabilities"].tolist()
    try:
        client.infer("digitz", rows)
    except NotFound as exc:
        answer["not_found"] = exc.status
answer["modules"] = sorted({m.split(".")[0] for m in sys.modules} & {"gateway", "starlette", "uvicorn", "onnxruntime",
                                                                     "scipy"})
print(json.dumps(answer))
"""


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("light-sdk") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT / "clients" / "python")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return python


def test_the_sdk_alone_installs_only_its_own_dependencies(light_python: Path) -> None:
    listed = subprocess.run([str(light_python), "-m", "pip", "list", "--format", "json"], capture_output=True,
                            text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert {"gateway-client", "authlib", "httpx", "numpy", "orjson"} <= names
    assert not names & {"gateway", "starlette", "uvicorn", "onnxruntime", "onnxruntime-gpu", "scipy"}
    typed = subprocess.run([str(light_python), "-c", "import gateway_client, pathlib; "
                            "print((pathlib.Path(gateway_client.__file__).parent / 'py.typed').exists())"],
                           capture_output=True, text=True, check=True, cwd="/")
    assert typed.stdout.strip() == "True"


def test_the_sdk_alone_serves_a_live_gateway(light_python: Path, gateway: Gateway, tmp_path: Path,
                                             models_root: Path) -> None:
    creds = credentials_for(gateway, tmp_path)
    rows = np.random.default_rng(5).uniform(0, 16, (3, 64)).astype(np.float32)
    out = subprocess.run([str(light_python), "-c", SCRIPT, str(creds), json.dumps(rows.tolist())],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout)
    assert answer["ready"] is True and "digits" in answer["models"] and answer["not_found"] == 404
    expected = onnx_reference(models_root, "digits", rows)
    np.testing.assert_allclose(np.array(answer["binary"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.array(answer["json"]), expected, atol=1e-5)
    assert answer["modules"] == []  # nothing of the server was imported (there is none to import)
