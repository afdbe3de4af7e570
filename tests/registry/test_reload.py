"""Hot reload: a new version swapped in under load with no failed request; a bad one refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gateway.audit.chain import load_public_key, stream_files, verify_paths
from gateway.cli import main
from gateway.registry.signing import sign_model
from tests.conftest import Gateway, onnx_reference, start_gateway
from tests.registry.test_supply import HOSTILE, _replace_model
from tests.test_metrics import value

pytestmark = pytest.mark.slow

X = np.random.default_rng(9).uniform(0, 16, (4, 64)).astype(np.float32)


def _sign(folder: Path, pki: Path) -> None:
    sign_model(folder, pki / "keys" / "model-signing.key")


def _new_version(root: Path, pki: Path, version: str, signed: bool = True) -> Path:
    """digits with its last initializer shifted: same signature, different answers."""
    src, dst = root / "digits" / "1", root / "digits" / version
    dst.mkdir()
    model = onnx.load(str(src / "model.onnx"))
    last = model.graph.initializer[-1]
    weights = numpy_helper.to_array(last)
    shift = np.linspace(0, 2, weights.size, dtype=np.float32).reshape(weights.shape)  # not uniform: softmax sees it
    last.CopyFrom(numpy_helper.from_array(weights + shift, last.name))
    manifest = json.loads((src / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    _replace_model(dst, model.SerializeToString())
    if signed:
        _sign(dst, pki)
    return dst


def _tamper(root: Path, pki: Path, version: str) -> Path:
    folder = _new_version(root, pki, version)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "model.onnx").write_bytes(bytes(data))
    return folder


def _extra_file(root: Path, pki: Path, version: str) -> Path:
    folder = _new_version(root, pki, version)
    (folder / "notes.txt").write_text("not signed")
    return folder


def _other_signer(root: Path, pki: Path, version: str) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = _new_version(root, pki, version, signed=False)
    key = root / f"other-{version}.key"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sign_model(folder, key)
    return folder


def _hostile(make: Callable[[Path], bytes]) -> Callable[[Path, Path, str], Path]:
    """A version folder holding a hostile model, correctly described and signed: admission must refuse it."""
    def build(root: Path, pki: Path, version: str) -> Path:
        folder = _new_version(root, pki, version, signed=False)
        _replace_model(folder, make(folder))
        try:
            _sign(folder, pki)
        except ValueError:
            pass  # model-signing will not sign a folder with a symbolic link: refused as unsigned
        return folder
    return build


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 30, every_s: float = 0.2) -> None:
    """Wait, without blocking the event loop, until ``check()`` holds; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(every_s)


def _logged(gw: Gateway, *texts: str) -> Callable[[], bool]:
    return lambda: any(t in gw.log.read_text() for t in texts)


def _infer(gw: Gateway, version: str | None = None) -> tuple[int, np.ndarray | None, str | None]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": X.ravel().tolist()}]}
    path = "/v2/models/digits" + (f"/versions/{version}" if version else "") + "/infer"
    with gw.client() as c:
        r = c.post(path, json=body)
    if r.status_code != 200:
        return r.status_code, None, None
    doc = r.json()
    return 200, np.array(doc["outputs"][0]["data"], np.float32).reshape(4, 10), doc["model_version"]


def _set_version(config: Path, version: str) -> None:
    text = config.read_text()
    marker = "[models.digits]\n"
    head, tail = text.split(marker)
    tail = "\n".join(line for line in tail.split("\n") if not line.startswith("version ="))
    config.write_text(head + marker + f'version = "{version}"\n' + tail)


@pytest.mark.anyio
async def test_reload_under_load_swaps_versions_without_a_failed_request_and_refuses_a_bad_one(
        models_root: Path, pki: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    v2 = _new_version(root, pki, "2")
    _new_version(root, pki, "3", signed=False)
    gw = start_gateway(pki, tmp_path, root)
    try:
        status, before, version = _infer(gw)
        assert status == 200 and version == "1"
        np.testing.assert_allclose(before, onnx_reference(root, "digits", X), rtol=1e-5, atol=1e-6)

        statuses: list[int] = []
        stop = asyncio.Event()

        async def load() -> None:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": X.ravel().tolist()}]}
            async with gw.async_client() as c:
                while not stop.is_set():
                    statuses.append((await c.post("/v2/models/digits/infer", json=body)).status_code)

        tasks = [asyncio.get_running_loop().create_task(load()) for _ in range(8)]
        await asyncio.sleep(1.0)
        _set_version(gw.config, "2")
        assert main(["models", "reload", "--config", str(gw.config)]) == 0
        await _until(lambda: _infer(gw)[2] == "2", "version 2 was not swapped in", 60, 0.3)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        status, after, version = _infer(gw)
        import onnxruntime as ort

        session = ort.InferenceSession(str(v2 / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(after, session.run(None, {"input": X})[0], rtol=1e-5, atol=1e-6)
        assert not np.allclose(after, before)
        with gw.client() as c:
            assert c.get("/v2/models/digits").json()["versions"] == ["2"]

        # Version 3 is unsigned: refused, and version 2 keeps serving.
        _set_version(gw.config, "3")
        assert main(["models", "reload", "--config", str(gw.config)]) == 0
        await _until(_logged(gw, "digits/3: refused"), "the refusal was not logged", 20)
        status, still, version = _infer(gw)
        assert status == 200 and version == "2"
        np.testing.assert_allclose(still, after, rtol=1e-6)
        # Version 4 is signed and admitted, but ONNX Runtime cannot load it: its worker dies at
        # load, the version is quarantined, and version 2 keeps serving.
        v4 = _new_version(root, pki, "4", signed=False)
        model = onnx.load(str(v4 / "model.onnx"))
        model.graph.node[0].op_type = "NoSuchOperator"
        _replace_model(v4, model.SerializeToString())
        _sign(v4, pki)
        _set_version(gw.config, "4")
        assert main(["models", "reload", "--config", str(gw.config)]) == 0
        await _until(_logged(gw, "digits/4: quarantine"), "the failing version was not quarantined")
        assert _infer(gw)[2] == "2"
        with gw.client("admin") as admin:  # what an alert on reloads sees
            scrape = admin.get("/metrics").text
        assert value(scrape, "gateway_model_version_refusals_total", model="digits") == 1
        assert value(scrape, "gateway_model_version_quarantined", model="digits", version="4") == 1
        # Every signature failure and every hostile file of the admission table, through the
        # running gateway: each refused with its reason while version 2 answers.
        cases = [("tampered", _tamper), ("extra file", _extra_file), ("other signer", _other_signer)]
        cases += [(name, _hostile(make)) for name, make, _ in HOSTILE]
        for n, (what, make_version) in enumerate(cases, start=10):
            folder = make_version(root, pki, str(n))
            _set_version(gw.config, str(n))
            assert main(["models", "reload", "--config", str(gw.config)]) == 0
            # Refused by the checks, or (the oversized initializer, under the default 2 GiB limit)
            # admitted and then quarantined when ONNX Runtime could not load it: never served.
            await _until(_logged(gw, f"digits/{n}: refuse", f"digits/{n}: quarantine"),
                         f"{what} ({folder}) was neither refused nor quarantined", every_s=0.1)
            assert _infer(gw)[2] == "2", what
    finally:
        gw.stop()
    events = [json.loads(line) for f in stream_files([tmp_path / "audit"])["supervisor"]
              for line in f.read_bytes().splitlines()]
    model_events = [e for e in events if e.get("kind") == "model"]
    assert any(e["event"] == "swap" and e["version"] == "2" for e in model_events)
    assert any(e["event"] == "refuse" and e["version"] == "3" and "unsigned" in str(e["reason"]) for e in model_events)
    assert any(e["event"] == "quarantine" and e["version"] == "4" for e in model_events)
    assert verify_paths([tmp_path / "audit"], load_public_key(pki / "keys" / "audit-signing.pub")).ok


def _set_versions(config: Path, default: str, others: list[str]) -> None:
    _set_version(config, default)
    text = config.read_text()
    marker = "[models.digits]\n"
    head, tail = text.split(marker)
    tail = "\n".join(line for line in tail.split("\n") if not line.startswith("versions ="))
    config.write_text(head + marker + f"versions = {json.dumps(others)}\n" + tail)


@pytest.mark.anyio
async def test_several_versions_side_by_side_and_their_reload(models_root: Path, pki: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    root = tmp_path / "models"
    for name in ("digits", "resnetish"):
        shutil.copytree(models_root / name, root / name)
    v2 = _new_version(root, pki, "2")
    config = tmp_path / "gateway.toml"
    gw = start_gateway(pki, tmp_path, root)  # version 1 only, then configured for both below
    try:
        _set_versions(gw.config, "2", ["1"])
        asked_for_1: list[int] = []
        watching = threading.Event()

        def ask_for_version_1() -> None:  # all through the reload: version 1 is never not served
            while not watching.is_set():
                asked_for_1.append(_infer(gw, "1")[0])
                time.sleep(0.05)

        watcher = threading.Thread(target=ask_for_version_1)
        watcher.start()
        try:
            assert main(["models", "reload", "--config", str(gw.config)]) == 0
            await _until(lambda: _infer(gw, "1")[2] == "1" and _infer(gw)[2] == "2",
                         "both versions were not served", 60, 0.3)
        finally:
            watching.set()
            watcher.join()
        assert asked_for_1 and set(asked_for_1) == {200}, {s: asked_for_1.count(s) for s in set(asked_for_1)}
        reference = {v: ort.InferenceSession(str(root / "digits" / v / "model.onnx"),
                                             providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]
                     for v in ("1", "2")}
        for asked, served in ((None, "2"), ("2", "2"), ("1", "1")):
            status, out, version = _infer(gw, asked)
            assert status == 200 and version == served
            np.testing.assert_allclose(out, reference[served], rtol=1e-5, atol=1e-6)
        assert _infer(gw, "3")[0] == 404
        with gw.client() as c:
            assert c.get("/v2/models/digits").json()["versions"] == ["2", "1"]
            assert c.get("/v2/models/digits/versions/1").json()["versions"] == ["1"]
            assert c.get("/v2/models/digits/versions/1/ready").status_code == 200
            listed = {(m["name"], m["version"]) for m in c.post("/v2/repository/index").json()}
            assert {("digits", "1"), ("digits", "2")} <= listed
        # Version 1 no longer wanted: it goes; the default stays.
        _set_versions(gw.config, "2", [])
        assert main(["models", "reload", "--config", str(gw.config)]) == 0
        await _until(lambda: _infer(gw, "1")[0] == 404, "version 1 was not removed", 30, 0.3)
        assert _infer(gw)[2] == "2"
    finally:
        gw.stop()
    assert config.exists() and v2.exists()
