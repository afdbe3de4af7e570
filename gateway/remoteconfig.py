"""The settings of remote workers: how a gateway reaches worker hosts (``[remote_workers]``) and
what a worker host serves (``[worker_host]``); ``gateway.config`` reads them with the rest."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RemoteWorkersConfig", "WorkerHostConfig"]


@dataclass(frozen=True)
class RemoteWorkersConfig:
    """``[remote_workers]``: how this gateway reaches worker hosts (``[models.NAME] endpoints``)."""

    cert_file: str = ""
    """The gateway's client certificate towards worker hosts (``gateway pki issue gateway``)."""
    key_file: str = ""
    ca_file: str = ""
    """The CA of the worker hosts' certificates (default: ``tls.client_ca_file``)."""
    identity: str = "spiffe://gateway.local/worker/"
    """A worker host's certificate must carry a URI SAN that starts with this."""
    eject_after: int = 1
    """Requests in a row that fail on an endpoint (a connection lost mid-request, a garbled
    answer) before it leaves rotation; a refused connection or a wrong identity ejects it at once."""
    answers_in_flight_mb: int = 1024
    """The most unfinished answers from one worker host hold at once, in MiB: each answer is bounded
    on its own (256 MiB, or its request's rows), but up to a model's ``max_inflight`` arrive together.
    The answer that crosses it fails (502). Raise it for models whose answers are large and many."""
    max_ejection_s: float = 60.0
    """The longest an endpoint is held out of rotation. One that fails again before it has served
    a request since it returned is held out for 1 s, then 2, 4 ... up to this, whatever its health
    checks say (a host that answers health but fails every request); a served request ends that."""


@dataclass(frozen=True)
class WorkerHostConfig:
    """``[worker_host]``, on a worker host only (``gateway worker serve``)."""

    clients: tuple[str, ...] = ("spiffe://gateway.local/gateway",)
    """The URI SANs of the gateways' client certificates it serves; any other is refused."""
