"""The SDK against live gateways over HTTPS with mTLS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.cli import main
from gateway_client import (
    AsyncClient,
    AuthenticationError,
    BudgetExhausted,
    Client,
    ClientCredentials,
    Forbidden,
    InvalidInput,
    NotFound,
    RateLimited,
    RetryPolicy,
    StepUpRequired,
    Timeout,
    Unavailable,
    ssl_context,
)
from tests.conftest import Gateway, credentials_for, fetch_token, onnx_reference, start_gateway
from tests.security.test_token_matrix import mint

pytestmark = pytest.mark.slow


@pytest.fixture
def creds(gateway: Gateway, tmp_path: Path) -> Path:
    return credentials_for(gateway, tmp_path)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnxruntime_on_both_models(creds: Path, models_root: Path, binary: bool) -> None:
    rng = np.random.default_rng(3)
    digits = rng.uniform(0, 16, (5, 64)).astype(np.float32)
    resnet = rng.uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    with Client.from_credentials(creds, "demo") as client:
        assert client.live() and client.ready()
        assert {m["name"] for m in client.models()} == {"digits", "resnetish"}
        got = client.infer("digits", digits, binary=binary)["probabilities"]
        np.testing.assert_allclose(got, onnx_reference(models_root, "digits", digits), rtol=1e-5, atol=1e-6)
        got = client.infer("resnetish", {"input": resnet}, version="1", binary=binary)["logits"]
        np.testing.assert_allclose(got, onnx_reference(models_root, "resnetish", resnet), rtol=1e-4, atol=1e-4)


@pytest.mark.anyio
async def test_async_client(creds: Path, models_root: Path) -> None:
    x = np.full((2, 64), 4.0, np.float32)
    async with AsyncClient.from_credentials(creds, "demo") as client:
        assert await client.ready()
        meta = await client.model_metadata("digits")
        out = await client.infer("digits", x)
    assert meta["inputs"][0]["name"] == "input"
    np.testing.assert_allclose(out["probabilities"], onnx_reference(models_root, "digits", x), rtol=1e-5, atol=1e-6)


def test_a_token_that_expires_mid_run_is_refreshed_without_a_failed_call(gateway: Gateway, creds: Path) -> None:
    demo = json.loads(creds.read_text())["principals"]["demo"]
    ctx = ssl_context(gateway.pki / "certs" / "ca.pem", demo["cert"], demo["key"])
    source = ClientCredentials(f"{gateway.url}/oauth/token", demo["client_id"], demo["client_secret"], ctx,
                               refresh_leeway_s=900 - 1.0)  # tokens live 900 s: this one "expires" after 1 s
    x = np.ones((1, 64), np.float32)
    with Client(gateway.url, source, ssl_context=ctx) as client:
        end = time.monotonic() + 2.5
        calls = 0
        while time.monotonic() < end:
            assert client.infer("digits", {"input": x})["probabilities"].shape == (1, 10)
            calls += 1
        assert source.fetches >= 3 and calls > source.fetches  # refreshed before expiry, every call answered
        # A token the gateway refuses as expired (it was cached as good): one refresh, then success.
        source.set_token(mint(gateway, exp=int(time.time()) - 120, iat=int(time.time()) - 600),
                         expires_at=time.time() + 3600)
        before = source.fetches
        assert client.infer("digits", {"input": x})["probabilities"].shape == (1, 10)
        assert source.fetches == before + 1


def test_errors_are_typed_from_real_gateway_answers(gateway: Gateway, creds: Path) -> None:
    x = np.ones((1, 64), np.float32)
    with Client.from_credentials(creds, "demo") as client:
        with pytest.raises(NotFound) as missing:
            client.infer("no-such-model", {"input": x})
        assert missing.value.status == 404 and missing.value.request_id
        with pytest.raises(InvalidInput) as bad:
            client.infer("digits", {"input": np.full((1, 64), 99, np.float32)})
        assert bad.value.status == 422 and bad.value.field == "inputs['input']"
        with pytest.raises(InvalidInput):
            client.infer("digits", {"input": np.ones((1, 65), np.float32)})
        with pytest.raises(Forbidden):
            client.request("GET", "/metrics")
    ctx = ssl_context(gateway.pki / "certs" / "ca.pem", gateway.pki / "certs" / "client-admin.pem",
                      gateway.pki / "certs" / "client-admin.key")
    weak = fetch_token(gateway.url, gateway.pki, "admin", mfa=False)
    with Client(gateway.url, weak, ssl_context=ctx) as admin, pytest.raises(StepUpRequired) as step:
        admin.request("GET", "/admin/models")
    assert step.value.acr_values == "urn:gateway:acr:mfa"
    with Client(gateway.url, "not-a-token", ssl_context=ctx) as anon, pytest.raises(AuthenticationError) as auth:
        anon.infer("digits", {"input": x})
    assert not isinstance(auth.value, StepUpRequired)
    with Client.from_credentials(creds, "demo", retry=RetryPolicy(deadline_s=0.0001)) as hurried, pytest.raises(Timeout):
        hurried.infer("digits", {"input": x})


@pytest.fixture
def limited(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Iterator[Gateway]:
    """A gateway of its own per test: the limits and budget below are used up by each."""
    limits = ('strategy = "fixed-window"\nper_address = "100000/minute"\nper_principal = "3/2second"\n'
              'failed_auth_per_address = "100000/minute"\nbudget_inferences = "5/day"\n')
    gw = start_gateway(pki, tmp_path_factory.mktemp("gw-sdk-limits"), models_root, limits=limits)
    yield gw
    gw.stop()


def test_a_429_is_retried_after_its_retry_after_and_not_before(limited: Gateway, tmp_path: Path) -> None:
    sent: list[tuple[float, str]] = []
    creds = credentials_for(limited, tmp_path)

    def record(request: httpx.Request) -> None:
        sent.append((time.monotonic(), request.url.path))

    x = np.ones((1, 64), np.float32)
    with Client.from_credentials(creds, "demo", event_hooks={"request": [record]}) as client:
        for _ in range(3):  # fill the per-principal window of 3 per 2 seconds
            client.infer("digits", {"input": x})
        limited_at = time.monotonic()
        client.infer("digits", {"input": x})  # refused with 429 + Retry-After, then retried and served
    infers = [t for t, path in sent if path.endswith("/infer")]
    assert len(infers) == 5  # 3 served, 1 refused, 1 retried
    assert infers[-1] - infers[-2] >= 0.99  # it waited for Retry-After (>= 1 s), not less
    assert infers[-1] - limited_at < 3.5


def test_budget_exhausted_and_rate_limited_are_raised_with_their_details(limited: Gateway, tmp_path: Path) -> None:
    creds = credentials_for(limited, tmp_path)
    x = np.ones((1, 64), np.float32)
    served = 0
    with Client.from_credentials(creds, "demo", retry=RetryPolicy(deadline_s=10)) as client:
        with pytest.raises(BudgetExhausted) as exhausted:
            for _ in range(8):  # per-principal 429s are waited out; the budget's is not
                client.infer("digits", {"input": x})
                served += 1
    assert served == 5  # budget_inferences = 5/day
    budget = exhausted.value
    assert isinstance(budget, RateLimited) and budget.reset and budget.policy == "budget-inferences"
    assert budget.retry_after > 3600  # the day's budget: not worth waiting inside a call's deadline


def test_unavailable_after_the_deadline(pki: Path, tmp_path_factory: pytest.TempPathFactory, models_root: Path,
                                        tmp_path: Path) -> None:
    tmp = tmp_path_factory.mktemp("gw-sdk-503")
    gw = start_gateway(pki, tmp, models_root)
    stream = tmp / "audit" / "p0"
    try:
        creds = credentials_for(gw, tmp_path)
        with Client.from_credentials(creds, "demo", retry=RetryPolicy(deadline_s=1.5)) as client:
            client.infer("digits", {"input": np.ones((1, 64), np.float32)})
            stream.rename(tmp / "audit" / "away")
            stream.write_text("")  # the audit log cannot be written: 503 with Retry-After
            with pytest.raises(Unavailable) as exc:
                client.infer("digits", {"input": np.ones((1, 64), np.float32)})
            assert exc.value.status == 503 and exc.value.retry_after >= 1
            stream.unlink()
            (tmp / "audit" / "away").rename(stream)
    finally:
        gw.stop()


def test_the_infer_command(gateway: Gateway, creds: Path, tmp_path: Path, models_root: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    x = np.full((2, 64), 5.0, np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["infer", "digits", "--input", str(tmp_path / "x.npy"), "--credentials", str(creds)]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(np.array(printed["probabilities"]["data"], np.float32),
                               onnx_reference(models_root, "digits", x), rtol=1e-5, atol=1e-6)
    (tmp_path / "x.json").write_text(json.dumps({"input": x.tolist()}))
    assert main(["infer", "digits", "--input", str(tmp_path / "x.json"), "--credentials", str(creds), "--json",
                 "--output", str(tmp_path / "out.npz")]) == 0
    assert np.load(tmp_path / "out.npz")["probabilities"].shape == (2, 10)
    assert main(["infer", "nope", "--input", str(tmp_path / "x.npy"), "--credentials", str(creds)]) == 3  # not found
    assert "404" in capsys.readouterr().err


def test_connection_failures_are_retried_within_the_deadline(tmp_path: Path) -> None:
    from tests.conftest import free_port

    attempts: list[float] = []
    with Client(f"https://127.0.0.1:{free_port()}", "token", retry=RetryPolicy(deadline_s=1.0, base_s=0.05),
                event_hooks={"request": [lambda r: attempts.append(time.monotonic())]}) as client:
        with pytest.raises(Timeout):  # nothing listens: each attempt was refused before anything was sent
            client.infer("digits", {"input": np.ones((1, 64), np.float32)})
    assert len(attempts) >= 3 and attempts[-1] - attempts[0] < 1.0


def test_importing_the_sdk_pulls_in_no_server_and_no_onnxruntime() -> None:
    code = ("import sys, gateway_client; heavy = [m for m in ('onnxruntime', 'starlette', 'uvicorn', 'onnx', "
            "'limits', 'redis', 'prometheus_client', 'gateway.app', 'gateway.workers', 'gateway.security') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_token_endpoint_failures_are_typed_too(gateway: Gateway, creds: Path) -> None:
    from tests.conftest import free_port

    demo = json.loads(creds.read_text())["principals"]["demo"]
    ctx = ssl_context(gateway.pki / "certs" / "ca.pem", demo["cert"], demo["key"])
    wrong = ClientCredentials(f"{gateway.url}/oauth/token", demo["client_id"], "not-the-secret", ctx)
    with Client(gateway.url, wrong, ssl_context=ctx) as client, pytest.raises(AuthenticationError) as refused:
        client.infer("digits", {"input": np.ones((1, 64), np.float32)})
    assert "invalid_client" in refused.value.type
    nowhere = f"https://127.0.0.1:{free_port()}"
    unreachable = ClientCredentials(f"{nowhere}/oauth/token", demo["client_id"], demo["client_secret"], ctx)
    with Client(nowhere, unreachable, ssl_context=ctx, retry=RetryPolicy(deadline_s=1.0)) as client, \
            pytest.raises(Timeout):  # retried like any connection that was never made, within the deadline
        client.infer("digits", {"input": np.ones((1, 64), np.float32)})
