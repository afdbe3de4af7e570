"""The audit layer's work between requests: the log's open and close, its checkpoint ticker, the
health-probe summaries, and the TLS connections that never reached the application."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.audit.middleware import ProbeTally
from gateway.audit.writer import AuditUnavailable, AuditWriter
from gateway.metrics import Metrics
from gateway.security.tls import HANDSHAKES

__all__ = ["AuditBackground"]

log = logging.getLogger("gateway.audit")


class AuditBackground:
    def __init__(self, writer: AuditWriter | None, metrics: Metrics, probes: ProbeTally, probe_summary_s: float,
                 handshake_window_s: float = 5.0) -> None:
        self.writer = writer
        self.metrics = metrics
        self.probes = probes
        self.probe_summary_s = probe_summary_s
        self.handshake_window_s = handshake_window_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.writer is not None:
            self.writer.open()
            await self.writer.start_ticker()
            self._tasks.append(loop.create_task(self._summarize_probes()))
        self._tasks.append(loop.create_task(self._watch_handshakes()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.writer is not None:
            await self._write_probe_summary()
            await self.writer.close()

    async def _append(self, record: dict[str, object]) -> None:
        if self.writer is not None:
            with contextlib.suppress(AuditUnavailable):
                await self.writer.append(record)

    async def _write_probe_summary(self) -> None:
        summary = self.probes.summary(self.probe_summary_s)
        if summary is not None:
            await self._append(summary)

    async def _summarize_probes(self) -> None:
        while True:
            await asyncio.sleep(self.probe_summary_s)
            await self._write_probe_summary()

    async def _watch_handshakes(self) -> None:
        """Every window with any: one ``tls`` record of the connections that failed their handshake
        or were refused one, by client address and reason, a metric, and one log line."""
        while True:
            await asyncio.sleep(self.handshake_window_s)
            failures = HANDSHAKES.collect()
            if not failures:
                continue
            total = sum(n for reasons in failures.values() for n in reasons.values())
            self.metrics.tls_failures.inc(total)
            worst = sorted(failures.items(), key=lambda item: -sum(item[1].values()))[:3]
            log.warning("%d TLS connection(s) failed or were refused in the last %g s; most from %s", total,
                        self.handshake_window_s, "; ".join(f"{address} {reasons}" for address, reasons in worst))
            await self._append({"kind": "tls", "failed_handshakes": total, "window_s": self.handshake_window_s,
                                "by_address": failures})
