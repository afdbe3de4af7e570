"""Security events: one schema, written to the audit chain, counted, and sent to a webhook.

A detector that fires makes a ``SecurityEvent``. The audit layer writes it as its own record kind
(``security-event``) in the signed chain before the request's answer leaves, counts it in
``gateway_security_events_total`` by model, detector and action, and hands it to the
``EventSink``, which delivers batches to ``events.webhook_url`` from a background task, never on
the request's path:

* the body is ``{"events": [...]}``, signed with HMAC-SHA256 over ``"<unix time>." + body`` and
  sent as ``Gateway-Signature: t=<unix time>, v1=<hex>`` (receivers reject stale times: no replays);
* a batch that fails (connection error, timeout, any status but 2xx) is retried with exponential
  backoff (0.5 s doubling to 30 s) for ``events.retry_window_s``, then given up and counted;
* the queue holds ``events.queue_size`` events; beyond it new ones are dropped and counted. The
  audit chain holds every event either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.config import EventsConfig
from gateway.context import SecurityEvent

__all__ = ["EventSink", "SecurityEvent", "sign_body", "verify_signature"]

log = logging.getLogger("gateway.events")
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
ANSWER_BYTES = 64 * 1024
"""The most of a receiver's answer read; the rest is not (its status is what counts)."""


def sign_body(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp}, v1={mac}"


def verify_signature(secret: bytes, body: bytes, header: str, tolerance_s: float = 300.0,
                     now: float | None = None) -> bool:
    """A receiver's check: the signature matches and its time is within ``tolerance_s``."""
    try:
        parts = dict(p.strip().split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign_body(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class EventSink:
    """The bounded queue and the delivery task of one serving process."""

    def __init__(self, config: EventsConfig) -> None:
        self.config = config
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(config.queue_size)
        self.counts = {"delivered": 0, "failed_attempts": 0, "given_up": 0, "dropped": 0}
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._secret = Path(config.webhook_secret_file).read_bytes().strip() if config.webhook_url else b""

    @property
    def enabled(self) -> bool:
        return bool(self.config.webhook_url)

    def offer(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for the webhook; never waits (a full queue drops it and counts it)."""
        if not self.enabled:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._deliver_forever())

    async def stop(self, drain_s: float = 2.0) -> None:
        """Give queued events ``drain_s`` to go out, then stop."""
        if self._task is None:
            return
        deadline = time.monotonic() + drain_s
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _client(self) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if self.config.webhook_ca_file:
            verify = ssl.create_default_context(cafile=self.config.webhook_ca_file)
        return httpx.AsyncClient(timeout=self.config.timeout_s, verify=verify, follow_redirects=False)

    async def _deliver_forever(self) -> None:
        async with self._client() as client:
            while True:
                batch = [await self.queue.get()]
                while len(batch) < self.config.batch_size and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                await self._deliver(client, batch)

    async def _deliver(self, client: httpx.AsyncClient, batch: list[dict[str, Any]]) -> None:
        body = orjson.dumps({"events": batch})
        give_up_at = time.monotonic() + self.config.retry_window_s
        delay = BACKOFF_START_S
        while True:
            try:
                headers = {"content-type": "application/json",
                           "gateway-signature": sign_body(self._secret, body, int(time.time()))}
                status = await self._post(client, body, headers)
                if 200 <= status < 300:
                    self.counts["delivered"] += len(batch)
                    self.last_error = ""
                    return
                self.last_error = f"the receiver answered {status}"
            except httpx.HTTPError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            except TimeoutError:
                self.last_error = f"the receiver took more than {self.config.timeout_s} s to answer"
            self.counts["failed_attempts"] += 1
            if time.monotonic() + delay > give_up_at:
                self.counts["given_up"] += len(batch)
                log.error("gave up delivering %d security events to the webhook after %.0f s: %s",
                          len(batch), self.config.retry_window_s, self.last_error)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _post(self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> int:
        """The receiver's status, within ``timeout_s`` in all; of its answer's body at most
        ``ANSWER_BYTES`` is read (a receiver's word is its status), so neither a receiver that never
        ends its answer nor one that trickles it holds the delivery or the process's memory."""
        async with asyncio.timeout(self.config.timeout_s), \
                client.stream("POST", self.config.webhook_url, content=body, headers=headers) as response:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > ANSWER_BYTES:
                    break
            return response.status_code

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"queued": self.queue.qsize(), **self.counts}
        if self.last_error:
            out["last_error"] = self.last_error
        return out
