"""Prometheus metrics at ``/metrics`` (verb ``metrics``): requests, latency, refusals, workers,
providers, and the state an alert watches.

Request counters, latency and refusals (by the problem type the caller got) are observed by the
audit middleware, which sees every request's final outcome. Worker figures (queue depth, batch
sizes) are read from the workers' health at scrape time, and so is the state: what is degraded
(``gateway_degraded``), the incident controls in force, the certificates' expiry, the build, and
the process's own CPU, memory and descriptors. With ``server.processes > 1`` the request
counters, latency and refusals of every serving process are summed into each scrape
(prometheus_client's multiprocess mode); ``process_*`` describe the process that answered.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _WorkerCollector(Collector):
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("gateway_worker_queue_depth", "Requests queued or running in a worker",
                                  labels=["model", "worker"])
        inflight = GaugeMetricFamily("gateway_worker_inflight", "Requests this process has sent to a worker "
                                     "and not yet had back", labels=["model", "worker"])
        healthy = GaugeMetricFamily("gateway_worker_healthy", "1 when the worker is in rotation",
                                    labels=["model", "worker"])
        providers = GaugeMetricFamily("gateway_model_execution_provider", "Active ONNX Runtime execution "
                                      "providers per model (1 = active)", labels=["model", "provider"])
        batches = HistogramMetricFamily("gateway_batch_size", "Requests joined per session.run",
                                        labels=["model", "worker"])
        queued = CounterMetricFamily("gateway_worker_queue_seconds", "Time requests waited in a worker for "
                                     "their batch to start, summed", labels=["model", "worker"])
        compute = CounterMetricFamily("gateway_worker_compute_seconds", "Time requests' batches ran in the "
                                      "model, summed per request", labels=["model", "worker"])
        restarts = CounterMetricFamily("gateway_worker_restarts", "Times the supervisor restarted a worker "
                                       "process after it died or stopped answering", labels=["model", "worker"])
        ejected = CounterMetricFamily("gateway_worker_ejections", "Times a worker host left rotation for failed "
                                      "requests (outlier ejection)", labels=["model", "worker"])
        versions = GaugeMetricFamily("gateway_worker_model_version", "The model version each worker (a worker "
                                     "host's, by its address) says it runs", labels=["model", "worker", "version"])
        for model, workers in self.pool.workers.items():
            for w in workers:
                labels = [model, w.endpoint or str(w.index)]  # a worker host by its address
                depth.add_metric(labels, float(w.info.get("queue_depth", 0)))
                inflight.add_metric(labels, float(w.inflight))
                healthy.add_metric(labels, 1.0 if w.healthy else 0.0)
                sizes = {int(k): int(v) for k, v in (w.info.get("batch_sizes") or {}).items()}
                cumulative = []
                for bound in BATCH_BUCKETS:
                    cumulative.append((str(bound), float(sum(v for k, v in sizes.items() if k <= bound))))
                cumulative.append(("+Inf", float(sum(sizes.values()))))
                batches.add_metric(labels, cumulative, sum_value=float(sum(k * v for k, v in sizes.items())))
                queued.add_metric(labels, float(w.info.get("queue_seconds", 0.0)))
                compute.add_metric(labels, float(w.info.get("compute_seconds", 0.0)))
                restarts.add_metric(labels, float(w.restarts))
                if w.endpoint:
                    ejected.add_metric(labels, float(w.ejected))
                if w.info.get("version"):
                    versions.add_metric([*labels, str(w.info["version"])], 1.0)
            for provider in self.pool.providers(model):
                providers.add_metric([model, provider], 1.0)
        yield from (depth, inflight, healthy, batches, queued, compute, restarts, ejected, versions, providers)
        supervision = self.pool.supervision
        refused = CounterMetricFamily("gateway_model_version_refusals", "Model versions a reload refused (signature, "
                                      "admission, calibration), per model, since start-up", labels=["model"])
        for model, count in (supervision.get("refused") or {}).items():
            refused.add_metric([model], float(count))
        quarantined = GaugeMetricFamily("gateway_model_version_quarantined", "Model versions whose workers died at "
                                        "load (1 each; the previous version keeps serving)", labels=["model", "version"])
        for entry in supervision.get("quarantined") or []:
            quarantined.add_metric([str(entry["model"]), str(entry["version"])], 1.0)
        yield from (refused, quarantined)


class _GuardCollector(Collector):
    """Detector failures and webhook deliveries, read from their owners at scrape time."""

    def __init__(self, health: Any, events: Any) -> None:
        self.health = health
        self.events = events

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily("gateway_guard_errors", "Guard runs that failed or timed out (on_error applied)",
                                     labels=["model"])
        for model, count in (self.health.errors if self.health is not None else {}).items():
            errors.add_metric([model], float(count))
        yield errors
        if self.events is None or not self.events.enabled:
            return
        status = self.events.status()
        deliveries = CounterMetricFamily("gateway_security_event_deliveries", "Security events by webhook delivery "
                                         "result (delivered, given_up after the retry window, dropped on a full queue)",
                                         labels=["result"])
        for result in ("delivered", "given_up", "dropped"):
            deliveries.add_metric([result], float(status[result]))
        yield deliveries
        failures = CounterMetricFamily("gateway_security_event_delivery_failures", "Webhook attempts that failed "
                                       "(each is retried with backoff)")
        failures.add_metric([], float(status["failed_attempts"]))
        yield failures
        queued = GaugeMetricFamily("gateway_security_event_queue", "Security events waiting for the webhook")
        queued.add_metric([], float(status["queued"]))
        yield queued


class _StateCollector(Collector):
    """What is degraded, the incident controls in force, certificate expiry and the build, at scrape time."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        degraded = GaugeMetricFamily("gateway_degraded", "1 while a part serves in a degraded way (limits, "
                                     "incidents, extraction per process; guard, events failing)", labels=["area"])
        for area in ("limits", "incidents", "extraction", "guard", "events"):
            degraded.add_metric([area], 1.0 if area in state.get("degraded", {}) else 0.0)
        yield degraded
        controls = GaugeMetricFamily("gateway_incident_controls", "Incident controls in force, by kind "
                                     "(lockdown: 1 while the gateway is locked down)", labels=["kind"])
        for kind, count in state.get("controls", {}).items():
            controls.add_metric([kind], float(count))
        yield controls
        expiry = GaugeMetricFamily("gateway_certificate_expiry_timestamp_seconds", "When a certificate the gateway "
                                   "serves or trusts expires (Unix time)", labels=["certificate", "subject"])
        for which, subject, when in state.get("certificates", []):
            expiry.add_metric([which, subject], when)
        yield expiry
        fetch_errors = CounterMetricFamily("gateway_jwks_fetch_errors", "Failed fetches of an external "
                                           "provider's signing keys (discovery or JWKS)", labels=["issuer"])
        fresh = GaugeMetricFamily("gateway_jwks_fresh", "1 while an external provider's keys are within "
                                  "jwks_ttl_s of their last fetch (0: its tokens get 503)", labels=["issuer"])
        for jwks in state.get("jwks", []):
            fetch_errors.add_metric([jwks["issuer"]], float(jwks["fetch_errors"]))
            fresh.add_metric([jwks["issuer"]], 1.0 if jwks["fresh"] else 0.0)
        yield fetch_errors
        yield fresh
        info = GaugeMetricFamily("gateway_build_info", "The gateway's version and Python's", labels=["version", "python"])
        info.add_metric([state.get("version", ""), platform.python_version()], 1.0)
        yield info


class Metrics:
    def __init__(self, pool: Any, health: Any = None, events: Any = None) -> None:
        self.pool = pool
        self._children: dict[tuple[str, str, str, str, int], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gateway_requests", "Requests by route, model, model version, outcome and status",
                                ["route", "model", "version", "outcome", "status"], registry=self.registry)
        self.latency = Histogram("gateway_request_duration_seconds", "Time from request to response",
                                 ["route", "model", "version"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.audit_records = Counter("gateway_audit_records", "Audit records written (requests, security events, "
                                     "checkpoints and the rest)", registry=self.registry)
        self.tls_failures = Counter("gateway_tls_handshake_failures", "TLS handshakes that did not complete",
                                    registry=self.registry)
        self.security_events = Counter("gateway_security_events", "Security events by model, detector and action",
                                       ["model", "detector", "action"], registry=self.registry)
        self.limit_refusals = Counter("gateway_limit_refusals", "Requests refused by a rate limit or query budget, "
                                      "by route and policy (per-address, failed-auth, per-principal, global, "
                                      "per-principal-model, budget-inferences, budget-rows...)", ["route", "policy"],
                                      registry=self.registry)
        self.refusals = Counter("gateway_refusals", "Requests refused or failed, by route and the problem type the "
                                "caller got (unauthorized, credential-revoked, rate-limited, budget-exhausted, "
                                "not-found, invalid-input, adversarial-input, lockdown...)", ["route", "type"],
                                registry=self.registry)
        # With several serving processes (``PROMETHEUS_MULTIPROC_DIR``, set by ``gateway serve``)
        # the counters and histograms above live in shared files and a scrape reads all of them;
        # the collectors below report what the answering process sees (the same in every one:
        # the workers, the state) and, for process_*, that process itself.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.scrape = CollectorRegistry(auto_describe=True) if self.multiprocess else self.registry
        if self.multiprocess:
            MultiProcessCollector(self.scrape)  # type: ignore[no-untyped-call]
        self.scrape.register(_WorkerCollector(pool))
        self.scrape.register(_GuardCollector(health, events))
        ProcessCollector(registry=self.scrape)
        PlatformCollector(registry=self.scrape)

    def watch_state(self, state: Callable[[], dict[str, Any]]) -> None:
        """Read ``state()`` at each scrape: ``degraded`` (area: why), ``controls`` (kind: count),
        ``certificates`` ([(which, subject, expiry timestamp)]), ``version``."""
        self.scrape.register(_StateCollector(state))

    def observe(self, route: str, model: str, outcome: str, status: int, seconds: float,
                problem: str | None = None, version: str = "-", policy: str | None = None) -> None:
        key = (route, model, version, outcome, status)
        children = self._children.get(key)
        if children is None:  # labels() validates and locks on every call: ~10 µs a request saved
            if len(self._children) >= 4096:
                self._children.clear()
            children = self._children[key] = (self.requests.labels(route, model, version, outcome, str(status)),
                                               self.latency.labels(route, model, version))
        children[0].inc()
        children[1].observe(seconds)
        if problem is not None:
            self.refusals.labels(route, problem).inc()
        if policy is not None:
            self.limit_refusals.labels(route, policy).inc()

    async def render(self) -> bytes:
        await self.pool.refresh()  # fresh queue depths and batch statistics
        return bytes(generate_latest(self.scrape))
