"""Which model versions run, and telling the serving processes: the version reloader.

At start-up it loads each configured unit's verified model and has the ``ProcessMonitor`` start
its workers. ``reload`` (SIGHUP, ``gateway models reload``) swaps in a changed model version:
verified and admitted first, started on new sockets, published in ``routes.json`` for the serving
processes once healthy, the old workers retired after the request deadline; a refused version, or
one whose workers die at load (quarantined), leaves the serving one in place. ``routes.json`` names
each worker's socket and the process and user it must be; it is republished whenever a worker
restarts. Every load, refusal, quarantine and swap is kept in ``events`` for the audit log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from gateway.config import Config, ModelConfig
from gateway.guards.extraction import check_extraction
from gateway.guards.guard import check_guard
from gateway.registry.loading import load_model_bytes
from gateway.registry.manifest import Manifest, ManifestError, load_manifest
from gateway.units import Unit
from gateway.workers.monitor import ProcessMonitor, WorkerProcess, WorkerStartError
from gateway.workers.pool import ROUTES

__all__ = ["Supervisor", "WorkerStartError"]

log = logging.getLogger("gateway.supervisor")


class Supervisor:
    def __init__(self, config: Config, manifests: dict[Unit, Manifest], runtime_dir: Path) -> None:
        self.config = config
        self.manifests = manifests
        self.runtime_dir = runtime_dir
        self.monitor = ProcessMonitor(config, runtime_dir, self._model_bytes, self.publish_routes)
        self.generation: dict[Unit, int] = {unit: 0 for unit, _ in config.units()}
        self._models: dict[tuple[Unit, int], bytes] = {}
        self._published = False
        self._publishing = threading.Lock()  # the reload thread and the monitor (on restarts) both publish
        self._reloading = threading.Lock()
        self.events: list[dict[str, object]] = []  # loads, refusals and swaps, for the audit log
        self.quarantined: set[tuple[Unit, str]] = set()  # (unit, sha256) whose workers died at load
        self.quarantined_versions: set[tuple[str, str]] = set()  # the same, as (model, version), for metrics
        self.refusals: dict[str, int] = {}  # versions refused by the checks, per model, since start-up

    def _model_bytes(self, w: WorkerProcess) -> bytes:
        return self._models[(w.unit, w.generation)]

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.monitor.prepare()
        configured = dict(self.config.units())
        for unit, manifest in self.manifests.items():
            settings = configured[unit]
            self._models[(unit, 0)] = load_model_bytes(manifest, self.config.supply, settings.kek_file,
                                                       remote=settings.workers == 0)
            check_guard(manifest, configured[unit].guard)  # its calibration, signed with the model
            check_extraction(manifest, configured[unit].extraction)
            self._event("load", manifest, 0)
        for unit, settings in self.config.units():
            self.monitor.create(unit, settings, 0)
        self.monitor.start()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker answered; then publish the routes for the serving processes."""
        self.monitor.wait_ready(list(self.monitor.workers), timeout_s)
        self._published = True
        self.publish_routes()

    def stop(self) -> None:
        self.monitor.stop()

    def pids(self) -> dict[str, list[int]]:
        return self.monitor.pids()

    # routes ----------------------------------------------------------------------------------
    def publish_routes(self) -> None:
        """Write which workers serve which unit now, atomically (once start-up has finished)."""
        if not self._published:
            return
        with self._publishing, self.monitor.lock:  # a snapshot and its write, one publisher at a time
            models = {}
            for unit, manifest in self.manifests.items():
                gen = self.generation[unit]
                models[unit.key] = {
                    "version": manifest.version, "generation": gen, "sha256": manifest.sha256,
                    "manifest": str(manifest.path),
                    "workers": [{"socket": str(w.socket), "pid": w.pid, "uid": w.uid if w.uid is not None else os.geteuid(),
                                 "restarts": w.restarts}
                                for w in self.monitor.workers if w.unit == unit and w.generation == gen],
                }
            tmp = self.runtime_dir / f".{ROUTES}.tmp"
            supervision = {"refused": self.refusals,
                           "quarantined": [{"model": m, "version": v} for m, v in sorted(self.quarantined_versions)]}
            tmp.write_text(json.dumps({"models": models, "supervision": supervision}, indent=1))
            os.replace(tmp, self.runtime_dir / ROUTES)

    # reload ----------------------------------------------------------------------------------
    def _event(self, kind: str, manifest: Manifest, generation: int, reason: str = "") -> None:
        event: dict[str, object] = {"event": kind, "model": manifest.name, "version": manifest.version,
                                    "sha256": manifest.sha256, "generation": generation}
        if reason:
            event["reason"] = reason
        self.events.append(event)
        (log.warning if kind in ("refuse", "quarantine") else log.info)(
            "model %s/%s: %s%s", manifest.name, manifest.version, kind, f" ({reason})" if reason else "")
        if kind in ("refuse", "quarantine"):  # for the serving processes' metrics
            if kind == "refuse":
                self.refusals[manifest.name] = self.refusals.get(manifest.name, 0) + 1
            else:
                self.quarantined_versions.add((manifest.name, manifest.version))
            self.publish_routes()

    def reload(self, config: Config) -> list[dict[str, object]]:
        """Swap in every configured model version that changed, each only once it is verified,
        admitted and its new workers are healthy; a refused or failing version leaves the serving
        one in place. Returns the events of this reload."""
        with self._reloading:  # one reload at a time: a second SIGHUP waits for the first
            first = len(self.events)
            known = {m.name for m in self.config.models}
            units = [(u, m) for u, m in config.units() if u.model in known]  # a new model needs a restart
            # Pinned versions first: when the default moves from version 1 to 2 while 1 stays pinned,
            # 1 is served beside the default before the default leaves it, never not at all.
            units.sort(key=lambda unit_settings: unit_settings[0].default)
            for unit, settings in units:
                self._reload_unit(config, unit, settings)
            wanted = {u for u, _ in units}
            for unit in [u for u in self.manifests if u not in wanted and not u.default]:  # an extra version dropped
                manifest = self.manifests[unit]
                gone = [w for w in self.monitor.workers if w.unit == unit]
                with self.monitor.lock:
                    del self.manifests[unit], self.generation[unit]
                self.publish_routes()
                self._event("remove", manifest, 0)
                self._retire_later(gone)
            return self.events[first:]

    def _reload_unit(self, config: Config, unit: Unit, settings: ModelConfig) -> None:
        current = self.manifests.get(unit)
        try:
            manifest = load_manifest(Path(config.models_root) / unit.model / settings.version)
            if current is not None and manifest.version == current.version and manifest.sha256 == current.sha256:
                return
            if (unit, manifest.sha256) in self.quarantined:
                raise ManifestError(f"{unit}/{manifest.version} is quarantined (its worker died at load); "
                                    "change the model to try again")
            data = load_model_bytes(manifest, config.supply, settings.kek_file, remote=settings.workers == 0)
            check_guard(manifest, settings.guard)
            check_extraction(manifest, settings.extraction)
        except ManifestError as exc:
            self._event("refuse", _placeholder(unit, settings, current), self.generation.get(unit, 0), str(exc))
            return
        gen = self.generation.get(unit, -1) + 1
        self._models[(unit, gen)] = data
        self._event("load", manifest, gen)
        fresh = self.monitor.create(unit, settings, gen)
        try:
            self.monitor.wait_ready(fresh)
        except WorkerStartError as exc:
            self.monitor.retire(fresh)
            self._models.pop((unit, gen), None)
            self.quarantined.add((unit, manifest.sha256))
            self._event("quarantine", manifest, gen, str(exc)[:500])
            return
        old = [w for w in self.monitor.workers if w.unit == unit and w.generation != gen]
        with self.monitor.lock:
            self.manifests[unit], self.generation[unit] = manifest, gen
        self.publish_routes()
        self._event("swap" if current is not None else "add", manifest, gen)
        self._retire_later(old)

    def _retire_later(self, workers: list[WorkerProcess]) -> None:
        """In-flight requests on retiring workers finish; then they go."""
        def retire() -> None:
            self.monitor.retire(workers)
            for w in workers:
                self._models.pop((w.unit, w.generation), None)

        threading.Timer(self.config.server.request_timeout_s + 2.0, retire).start()


def _placeholder(unit: Unit, settings: ModelConfig, current: Manifest | None) -> Manifest:
    """What a refusal record names when the new version's manifest itself could not be read."""
    if current is None:
        return Manifest(unit.model, settings.version, Path("."), (), (), "")
    return replace(current, version=settings.version, sha256="")
