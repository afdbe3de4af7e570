"""``Client`` and ``AsyncClient``: the gateway's Open Inference Protocol with tokens, mTLS and retries.

    from gateway_client import Client

    with Client.from_credentials("credentials.json", principal="demo") as client:
        probabilities = client.infer("digits", np.full((1, 64), 8, np.float32))["probabilities"]

Retries, with exponential backoff and full jitter, within one total deadline (``deadline_s``):

* 429 and 503, waiting at least their ``Retry-After`` (never sooner); if that is past the deadline,
  the error is raised at once;
* a connection that could not be made (nothing was sent);
* a 401 ``invalid_token`` once, after fetching a new token, when the token source can.

Nothing else is retried: a 4xx is the caller's to fix, and a call that may have reached the
server is not sent twice blindly.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from gateway_client.auth import CallableToken, ClientCredentials, PasswordSignIn, StaticToken, TokenSource, totp_code
from gateway_client.errors import ConnectionFailed, RateLimited, Timeout, Unavailable, from_response
from gateway_client.protocol.codec import RequestedOutput, Tensor, decode_infer_response, encode_infer_request

__all__ = ["AsyncClient", "Client", "RetryPolicy", "ssl_context"]

Inputs = Mapping[str, np.ndarray] | np.ndarray


def ssl_context(ca: str | Path | None = None, cert: str | Path | None = None,
                key: str | Path | None = None) -> ssl.SSLContext:
    """A client TLS context: the gateway's CA (or the system's) and, for mTLS, a certificate and key."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass(frozen=True)
class RetryPolicy:
    deadline_s: float = 30.0
    """Total time for one call, retries and waits included."""
    base_s: float = 0.1
    max_backoff_s: float = 5.0
    max_attempts: int = 8

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.base_s * 2 ** attempt))  # full jitter


def _auth_from(token: str | TokenSource | Any | None) -> TokenSource | None:
    if token is None or isinstance(token, TokenSource):
        return token
    if isinstance(token, str):
        return StaticToken(token)
    if callable(token):
        return CallableToken(token)
    raise TypeError("token must be a string, a TokenSource or a callable returning a string")


def _tensors(inputs: Inputs, input_name: str | None) -> list[Tensor]:
    if isinstance(inputs, np.ndarray):
        if input_name is None:
            raise ValueError("pass inputs as {name: array}, or give input_name for a single array")
        inputs = {input_name: inputs}
    return [Tensor(name, np.asarray(array)) for name, array in inputs.items()]


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    return body if isinstance(body, dict) else {"detail": response.text[:500]}


class _Base:
    def __init__(self, url: str, token: str | TokenSource | Any | None, ssl_context: ssl.SSLContext | None,
                 retry: RetryPolicy | None) -> None:
        self.url = url.rstrip("/")
        self.auth = _auth_from(token)
        self.ssl_context = ssl_context if ssl_context is not None else ssl.create_default_context()
        self.retry = retry or RetryPolicy()
        self._input_names: dict[tuple[str, str | None], str] = {}

    @classmethod
    def _credentials(cls, path: str | Path, principal: str) -> dict[str, Any]:
        data = json.loads(Path(path).read_text())
        creds = data["principals"][principal]
        ctx = ssl_context(data.get("ca"), creds.get("cert"), creds.get("key"))
        token: TokenSource | None = None
        if "client_secret" in creds:
            token = ClientCredentials(data["token_endpoint"], creds["client_id"], creds["client_secret"], ctx)
        elif "password" in creds:  # a person: the enrolled TOTP secret when the file has it, else asked for
            secret = creds.get("totp_secret")
            code = (lambda: totp_code(secret)) if secret else (lambda: input(f"TOTP code for {creds['username']}: "))
            token = PasswordSignIn(data["token_endpoint"], creds["username"], creds["password"], code, ctx)
        return {"url": data["gateway"], "token": token, "ssl_context": ctx}

    def _headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _request_body(self, model: str, inputs: Inputs, outputs: list[str] | None, version: str | None,
                      parameters: dict[str, Any] | None, binary: bool, input_name: str | None,
                      ) -> tuple[str, bytes, dict[str, str]]:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        requested = [RequestedOutput(name, binary) for name in outputs] if outputs else None
        body, header_length = encode_infer_request(_tensors(inputs, input_name), requested, binary, parameters)
        headers = {"Content-Type": "application/octet-stream" if header_length is not None else "application/json"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        return path, body, headers

    @staticmethod
    def _outputs(response: httpx.Response) -> dict[str, np.ndarray]:
        length = response.headers.get("inference-header-content-length")
        _, tensors = decode_infer_response(response.content, int(length) if length else None)
        return {t.name: t.array for t in tensors}

    def _attempts(self, method: str, path: str) -> _Attempts:
        return _Attempts(self, f"{method} {path}")


class _Attempts:
    """One call's retry state, shared by the sync and async loops: they only sleep and send."""

    def __init__(self, client: _Base, what: str) -> None:
        self.client, self.what = client, what
        self.retry = client.retry
        self.started, self.attempt, self.refreshed = time.monotonic(), 0, False

    def remaining(self) -> float:
        left = self.retry.deadline_s - (time.monotonic() - self.started)
        if left <= 0:
            raise Timeout(f"{self.what}: no answer within {self.retry.deadline_s} s")
        return left

    def timed_out(self) -> Timeout:
        return Timeout(f"{self.what}: no answer within {self.retry.deadline_s} s")

    def unmade_connection(self, exc: Exception) -> float:
        """Seconds to wait before trying a connection that was never made again (nothing was sent)."""
        wait = self.retry.backoff(self.attempt)
        url = self.client.url
        if time.monotonic() - self.started + wait >= self.retry.deadline_s:
            raise Timeout(f"no connection to {url} within {self.retry.deadline_s} s: {exc}") from exc
        if self.attempt + 1 >= self.retry.max_attempts:
            raise ConnectionFailed(f"cannot connect to {url} after {self.attempt + 1} attempts: {exc}") from exc
        self.attempt += 1
        return wait

    def answered(self, response: httpx.Response) -> float | None:
        """None when the answer is the caller's; else the seconds to wait before trying again.
        Raises the typed error when the answer must not be retried."""
        if response.status_code < 400:
            return None
        error = from_response(response.status_code, _problem(response),
                              {k.lower(): v for k, v in response.headers.items()})
        auth = self.client.auth
        if (response.status_code == 401 and 'error="invalid_token"' in response.headers.get("www-authenticate", "")
                and not self.refreshed and auth is not None and auth.refreshable):
            auth.invalidate()  # one new token, at once
            self.refreshed = True
            return 0.0
        if isinstance(error, RateLimited | Unavailable) and self.attempt + 1 < self.retry.max_attempts:
            wait = max(error.retry_after, self.retry.backoff(self.attempt))
            if time.monotonic() - self.started + wait < self.retry.deadline_s:
                self.attempt += 1
                return wait
        raise error


class Client(_Base):
    """Synchronous client. ``token`` is a string, a ``TokenSource`` or a callable returning a string."""

    def __init__(self, url: str, token: str | TokenSource | Any | None = None, *,
                 ssl_context: ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 **httpx_options: Any) -> None:
        super().__init__(url, token, ssl_context, retry)
        self._http = httpx.Client(base_url=self.url, verify=self.ssl_context, timeout=self.retry.deadline_s,
                                  **httpx_options)

    @classmethod
    def from_credentials(cls, path: str | Path = "credentials.json", principal: str = "demo", **kwargs: Any) -> Client:
        """The ``credentials.json`` that ``gateway init`` writes: address, CA, certificate and token credentials."""
        return cls(**{**cls._credentials(path, principal), **kwargs})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, content: bytes | None = None, json_body: Any = None,
                headers: dict[str, str] | None = None, authenticated: bool = True) -> httpx.Response:
        """One call with this client's token, retries and deadline; raises the typed errors."""
        attempts = self._attempts(method, path)
        while True:
            remaining = attempts.remaining()
            try:
                token = self.auth.token() if (authenticated and self.auth) else None  # may fetch one
                response = self._http.request(method, path, content=content, json=json_body,
                                              headers={**self._headers(token), **(headers or {})}, timeout=remaining)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent: safe to try again
                time.sleep(attempts.unmade_connection(exc))
                continue
            except httpx.TimeoutException as exc:
                raise attempts.timed_out() from exc
            wait = attempts.answered(response)
            if wait is None:
                return response
            time.sleep(wait)

    # -- incident controls (verb admin:incident) ------------------------------------------------
    def alarms(self) -> list[dict[str, Any]]:
        """The model-extraction alarms in force."""
        return list(self.request("GET", "/admin/principals").json()["alarms"])

    def clear_principal(self, principal: str, reason: str, model: str | None = None) -> list[dict[str, Any]]:
        """Lift ``principal``'s extraction alarms (on ``model``, or all) and forget its watched
        queries; the alarms cleared. ``reason`` goes to the audit log."""
        body = {"principal": principal, "reason": reason, **({"model": model} if model else {})}
        return list(self.request("POST", "/admin/principals/clear", json_body=body).json()["cleared"])

    # -- the protocol ---------------------------------------------------------------------------
    def live(self) -> bool:
        return bool(self.request("GET", "/v2/health/live", authenticated=False).json().get("live"))

    def ready(self) -> bool:
        try:
            return bool(self.request("GET", "/v2/health/ready", authenticated=False).json().get("ready"))
        except Unavailable:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v2").json())

    def models(self) -> list[dict[str, Any]]:
        """The models this principal may use."""
        return list(self.request("GET", "/v2/models").json()["models"])

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", f"/v2/models/{model}" + (f"/versions/{version}" if version else "")).json())

    def infer(self, model: str, inputs: Inputs, *, outputs: list[str] | None = None, version: str | None = None,
              parameters: dict[str, Any] | None = None, binary: bool = True, input_name: str | None = None,
              ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (``{name: array}``, or one array, whose name is looked up if not
        given); returns ``{output name: array}``. Binary tensors by default, JSON with ``binary=False``."""
        return self.infer_result(model, inputs, outputs=outputs, version=version, parameters=parameters,
                                 binary=binary, input_name=input_name).outputs

    def infer_result(self, model: str, inputs: Inputs, *, outputs: list[str] | None = None, version: str | None = None,
                     parameters: dict[str, Any] | None = None, binary: bool = True, input_name: str | None = None,
                     ) -> InferResult:
        """As ``infer``, with the request id and the guard's finding (the ``Gateway-Finding`` header
        of a model whose guard flags) beside the outputs."""
        if isinstance(inputs, np.ndarray) and input_name is None:
            key = (model, version)
            if key not in self._input_names:  # one metadata call per model, not per inference
                self._input_names[key] = self.model_metadata(model, version)["inputs"][0]["name"]
            input_name = self._input_names[key]
        path, body, headers = self._request_body(model, inputs, outputs, version, parameters, binary, input_name)
        response = self.request("POST", path, content=body, headers=headers)
        return InferResult(self._outputs(response), response.headers.get("x-request-id", ""),
                           response.headers.get("gateway-finding"))


@dataclass(frozen=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    request_id: str
    finding: str | None
    """``adversarial-input; technique="AML.T0043"`` when flagged."""


class AsyncClient(_Base):
    """The asyncio twin of ``Client`` (same methods, awaited)."""

    def __init__(self, url: str, token: str | TokenSource | Any | None = None, *,
                 ssl_context: ssl.SSLContext | None = None, retry: RetryPolicy | None = None,
                 **httpx_options: Any) -> None:
        super().__init__(url, token, ssl_context, retry)
        self._http = httpx.AsyncClient(base_url=self.url, verify=self.ssl_context, timeout=self.retry.deadline_s,
                                       **httpx_options)

    @classmethod
    def from_credentials(cls, path: str | Path = "credentials.json", principal: str = "demo",
                         **kwargs: Any) -> AsyncClient:
        return cls(**{**cls._credentials(path, principal), **kwargs})

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _token(self) -> str | None:
        if self.auth is None:
            return None
        return await asyncio.to_thread(self.auth.token)  # a fetch blocks on the network: not on the loop

    async def request(self, method: str, path: str, *, content: bytes | None = None, json_body: Any = None,
                      headers: dict[str, str] | None = None, authenticated: bool = True) -> httpx.Response:
        attempts = self._attempts(method, path)
        while True:
            remaining = attempts.remaining()
            try:
                token = await self._token() if authenticated else None
                response = await self._http.request(method, path, content=content, json=json_body,
                                                    headers={**self._headers(token), **(headers or {})},
                                                    timeout=remaining)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                await asyncio.sleep(attempts.unmade_connection(exc))
                continue
            except httpx.TimeoutException as exc:
                raise attempts.timed_out() from exc
            wait = attempts.answered(response)
            if wait is None:
                return response
            await asyncio.sleep(wait)

    async def live(self) -> bool:
        return bool((await self.request("GET", "/v2/health/live", authenticated=False)).json().get("live"))

    async def ready(self) -> bool:
        try:
            return bool((await self.request("GET", "/v2/health/ready", authenticated=False)).json().get("ready"))
        except Unavailable:
            return False

    async def server_metadata(self) -> dict[str, Any]:
        return dict((await self.request("GET", "/v2")).json())

    async def models(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/v2/models")).json()["models"])

    async def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        return dict((await self.request("GET", path)).json())

    async def infer(self, model: str, inputs: Inputs, *, outputs: list[str] | None = None,
                    version: str | None = None, parameters: dict[str, Any] | None = None, binary: bool = True,
                    input_name: str | None = None) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray) and input_name is None:
            key = (model, version)
            if key not in self._input_names:
                self._input_names[key] = (await self.model_metadata(model, version))["inputs"][0]["name"]
            input_name = self._input_names[key]
        path, body, headers = self._request_body(model, inputs, outputs, version, parameters, binary, input_name)
        return self._outputs(await self.request("POST", path, content=body, headers=headers))

