"""NVIDIA's tritonclient, unchanged, against the gateway over HTTPS with mTLS.

Both the gevent-based client and the asyncio one read metadata and run ``infer`` on both demo
models, with JSON and with binary tensors; outputs equal in-process ONNX Runtime on the same file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.conftest import Gateway, client_context, onnx_reference

pytestmark = pytest.mark.anyio

OUTPUT = {"digits": "probabilities", "resnetish": "logits"}


def _input(name: str, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "digits":
        return rng.uniform(0, 16, (rows, 64)).astype(np.float32)
    return rng.uniform(-1, 1, (rows, 3, 224, 224)).astype(np.float32)


def _sync_client(gw: Gateway) -> httpclient.InferenceServerClient:
    # As the README shows it: an ssl.SSLContext holding the CA and the client certificate.
    return httpclient.InferenceServerClient(
        url=f"localhost:{gw.port}", ssl=True, ssl_context_factory=lambda: client_context(gw.pki)
    )


def _inputs(model: str, x: np.ndarray, binary: bool) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return [inp]


def test_server_and_model_metadata(gateway: Gateway) -> None:
    client = _sync_client(gateway)
    h = gateway.auth("demo")  # a bearer token from the built-in issuer, over the same mTLS
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits", headers=h) and client.is_model_ready("resnetish", headers=h)
    meta = client.get_model_metadata("digits", headers=h)
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    assert meta["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
    assert "binary_tensor_data" in client.get_server_metadata(headers=h)["extensions"]
    index = client.get_model_repository_index(headers=h)
    assert {m["name"] for m in index} == {"digits", "resnetish"}
    with httpx.Client(verify=client_context(gateway.pki), headers=h) as c:  # model health names the active providers
        ready = c.get(f"{gateway.url}/v2/models/resnetish/ready").json()
    assert ready == {"name": "resnetish", "ready": True, "parameters": {"execution_providers": ["CPUExecutionProvider"]}}
    client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model,rows", [("digits", 5), ("resnetish", 2)])
def test_sync_infer_equals_onnxruntime(gateway: Gateway, models_root: Path, model: str, rows: int, binary: bool) -> None:
    if model == "resnetish" and not binary:
        rows = 1  # 150,528 floats as JSON text per row: keep the JSON case small
    x = _input(model, rows, seed=rows + binary)
    client = _sync_client(gateway)
    outputs = [httpclient.InferRequestedOutput(OUTPUT[model], binary_data=binary)]
    result = client.infer(model, _inputs(model, x, binary), outputs=outputs, headers=gateway.auth("demo"))
    got = result.as_numpy(OUTPUT[model])
    np.testing.assert_allclose(got, onnx_reference(models_root, model, x), rtol=1e-5, atol=1e-5)
    client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", ["digits", "resnetish"])
async def test_aio_infer_equals_onnxruntime(gateway: Gateway, models_root: Path, model: str, binary: bool) -> None:
    x = _input(model, 1, seed=7)
    ctx: ssl.SSLContext = client_context(gateway.pki)
    async with aioclient.InferenceServerClient(url=f"localhost:{gateway.port}", ssl=True, ssl_context=ctx) as client:
        h = gateway.auth("demo")
        assert await client.is_model_ready(model, headers=h)
        assert (await client.get_model_metadata(model, headers=h))["name"] == model
        inp = aioclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = aioclient.InferRequestedOutput(OUTPUT[model], binary_data=binary)
        result = await client.infer(model, [inp], outputs=[out], model_version="1", headers=h)
    np.testing.assert_allclose(result.as_numpy(OUTPUT[model]), onnx_reference(models_root, model, x), rtol=1e-5, atol=1e-5)


def test_errors_surface_through_tritonclient(gateway: Gateway) -> None:
    client = _sync_client(gateway)
    x = np.full((1, 64), 99.0, np.float32)  # outside digits' declared domain [0, 16]
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", _inputs("digits", x, True), headers=gateway.auth("demo"))
    assert info.value.status() == "422" or "422" in str(info.value.status())
    assert "domain" in info.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("no-such-model", headers=gateway.auth("demo"))
    assert "unknown model" in missing.value.message()
    with pytest.raises(InferenceServerException) as anonymous:  # no token: 401, surfaced with its message
        client.infer("digits", _inputs("digits", np.zeros((1, 64), np.float32), True))
    assert "401" in str(anonymous.value.status()) and "bearer token" in anonymous.value.message()
    client.close()
