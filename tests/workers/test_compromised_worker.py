"""A compromised worker (code running as a worker's user: a model that escaped ONNX Runtime, say)
cannot redirect other models' traffic, forge answers, or touch another worker.

Played for real: the gateway runs as root, the test runs code as the digits worker's own user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Gateway, start_gateway

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege separation between workers needs a root "
                                                          "gateway (CI runs as root)")

INFER = "/v2/models/digits/infer"
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [4.0] * 64}]}

DROP = """
import os, sys
uid, gid = int(sys.argv.pop()), int(sys.argv.pop())
def drop():  # as a worker does: started by root, then its own user (it cannot even run Python from /root)
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
"""

PROBES = DROP + """
import json
runtime, routes, victim_pid, key = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
drop()
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "allowed"
    except PermissionError:
        out[name] = "denied"
    except OSError as exc:
        out[name] = f"error {exc.errno}"
def replace_routes():
    forged = os.path.join(runtime, ".routes.forged")
    with open(forged, "w") as f:
        f.write("{}")
    os.replace(forged, routes)
attempt("replace routes.json", replace_routes)
attempt("create a file in the runtime directory", lambda: open(os.path.join(runtime, "evil.sock"), "w"))
attempt("signal another worker", lambda: os.kill(victim_pid, 0))
attempt("read the server's private key", lambda: open(key).read())
print(json.dumps(out))
"""

FORGER = DROP + """
import socket
sys.path.insert(0, sys.argv[2])
import numpy as np
from gateway_client.protocol.codec import Tensor, encode_tensor_message
drop()
body, n = encode_tensor_message("outputs", [Tensor("probabilities", np.full((1, 10), 0.5, np.float32))])
answer = (b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\ninference-header-content-length: %d\\r\\n\\r\\n" % (len(body), n)) + body
health = b'{"ready": true, "providers": ["forged"]}'
health = b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n" % len(health) + health
listener = socket.socket(socket.AF_UNIX); listener.bind(sys.argv[1]); listener.listen(16)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    data = conn.recv(1 << 20)
    conn.sendall(health if b"/health" in data.split(b"\\r\\n", 1)[0] else answer)
    conn.close()
"""


def _write_routes(gw: Gateway, routes: dict[str, object]) -> None:
    path = gw.runtime_dir() / "routes.json"
    tmp = path.with_name(".routes.test")
    tmp.write_text(json.dumps({"models": routes}))
    os.replace(tmp, path)


def _infer(gw: Gateway) -> tuple[int, object]:
    with gw.client() as c:
        r = c.post(INFER, json=BODY)
        return r.status_code, r.json()


def test_a_compromised_worker_can_neither_redirect_nor_forge_nor_touch_another(
        pki: Path, tmp_path: Path, models_root: Path) -> None:
    # Where the default puts it: a fresh directory under /tmp, which every user can reach by path
    # (so what protects it is its own ownership and mode, not a private directory above it).
    gw = start_gateway(pki, tmp_path, models_root, runtime=Path(tempfile.mkdtemp(prefix="gateway-", dir="/tmp")))
    forger = None
    evil: Path | None = None
    try:
        routes = gw.routes()
        digits, resnet = routes["digits"]["workers"][0], routes["resnetish"]["workers"][0]
        assert 0 not in (digits["uid"], resnet["uid"]) and digits["uid"] != resnet["uid"], "one user id per worker"
        gid = os.stat(f"/proc/{digits['pid']}").st_gid
        runtime = gw.runtime_dir()
        as_digits = [str(gid), str(digits["uid"])]
        probes = subprocess.run(
            [sys.executable, "-c", PROBES, str(runtime), str(runtime / "routes.json"), str(resnet["pid"]),
             str(pki / "certs" / "server.key"), *as_digits], capture_output=True, text=True, timeout=30)
        assert json.loads(probes.stdout) == {
            "replace routes.json": "denied", "create a file in the runtime directory": "denied",
            "signal another worker": "denied", "read the server's private key": "denied"}, probes.stderr
        assert Path(f"/proc/{digits['pid']}/cwd").resolve() == runtime / "empty" and not os.listdir(runtime / "empty")

        # Had it found a way to name its own socket in the routes anyway, the gateway checks who
        # listens there before sending a byte: a forger answering 200 with made-up outputs.
        evil = Path(tempfile.mkdtemp(prefix="evil-", dir="/tmp"))  # somewhere that user can write
        os.chown(evil, digits["uid"], gid)
        forger = subprocess.Popen([sys.executable, "-c", FORGER, str(evil / "w.sock"), str(Path(__file__).parents[2]),
                                   *as_digits], stdout=subprocess.PIPE)
        assert forger.stdout is not None and forger.stdout.readline().strip() == b"ready"
        forged = {**routes["digits"], "generation": routes["digits"]["generation"] + 1,
                  "workers": [{**digits, "socket": str(evil / "w.sock")}]}
        _write_routes(gw, {**routes, "digits": forged})
        time.sleep(1.5)  # the serving process follows the routes every 0.5 s
        status, answer = _infer(gw)
        assert status == 503, answer  # never the forged 200
        assert "not the worker the supervisor started" in gw.log.read_text()

        restored = {**routes["digits"], "generation": routes["digits"]["generation"] + 2}
        _write_routes(gw, {**routes, "digits": restored})
        deadline = time.monotonic() + 10
        while (result := _infer(gw))[0] != 200:
            assert time.monotonic() < deadline, result
            time.sleep(0.3)
        probabilities = np.array(result[1]["outputs"][0]["data"])  # type: ignore[index]
        assert not np.allclose(probabilities, 0.5), "the real worker answers again"
    finally:
        if forger is not None:
            forger.kill()
            forger.wait()
            assert forger.stdout is not None
            forger.stdout.close()
        if evil is not None:
            shutil.rmtree(evil, ignore_errors=True)
        gw.stop()
