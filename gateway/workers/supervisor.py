"""Starts, watches and restarts the worker processes (the shape of uvicorn's multiprocess supervisor).

Per configured model it keeps ``workers`` processes alive, each on its own Unix socket inside a
private (0700) runtime directory. ``reload`` (SIGHUP, ``gateway models reload``) swaps in a changed
model version: verified and admitted first, started on new sockets, published in ``routes.json``
for the serving processes once healthy, the old workers retired after the request deadline; a
refused version, or one whose workers die at load (quarantined), leaves the serving one in place. Every worker gets a scrubbed environment (no gateway secrets),
the verified model bytes on its standard input, and, when the gateway runs as root, an
unprivileged user. A monitor thread pings each worker's ``/health``; a worker that exited or
stopped answering is killed and restarted with exponential backoff while the others keep serving.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config, ModelConfig
from gateway.registry.loading import load_model_bytes
from gateway.registry.manifest import Manifest
from gateway.workers.transport import fetch_health

__all__ = ["ROUTES", "Supervisor", "WorkerStartError", "socket_path"]

log = logging.getLogger("gateway.supervisor")

# Variables a worker may inherit: what the CUDA stack and the dynamic loader need, nothing else.
_PASS_ENV = ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TZ", "OPENBLAS_CORETYPE")


class WorkerStartError(RuntimeError):
    """A worker failed in a way a restart will not fix (bad device, model that does not load)."""


def socket_path(runtime_dir: str | Path, model: str, index: int, generation: int = 0) -> Path:
    """A worker's socket; a reloaded model's workers get a new generation (and new sockets)."""
    stem = f"{model}-{index}" if generation == 0 else f"{model}-g{generation}-{index}"
    return Path(runtime_dir) / f"{stem}.sock"


ROUTES = "routes.json"
"""In the runtime directory: which sockets serve which model version now (read by the serving
processes, written atomically by the supervisor at start-up and at every swap)."""


@dataclass
class _Worker:
    model: ModelConfig
    index: int
    socket: Path
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    last_ok: float = 0.0
    ready: bool = False
    restarts: int = 0
    last_error: str = ""
    stderr_path: Path = field(default_factory=Path)


class Supervisor:
    ping_interval_s = 0.5
    hang_timeout_s = 10.0
    start_timeout_s = 120.0
    max_backoff_s = 10.0

    def __init__(self, config: Config, manifests: dict[str, Manifest], runtime_dir: Path) -> None:
        self.config = config
        self.manifests = manifests
        self.runtime_dir = runtime_dir
        self.user = (config.server.worker_user or None) if os.geteuid() == 0 else None
        self.workers = [
            _Worker(m, i, socket_path(runtime_dir, m.name, i))
            for m in config.units()
            for i in range(m.workers)
        ]
        self._models: dict[tuple[str, int], bytes] = {}
        self.generation: dict[str, int] = {m.name: 0 for m in config.units()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards self.workers against the monitor while a reload swaps
        self._reloading = threading.Lock()
        self.events: list[dict[str, object]] = []  # loads, refusals and swaps, for the audit log
        self.quarantined: set[tuple[str, str]] = set()  # (model, sha256) whose workers died at load

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.runtime_dir, entry.pw_uid, entry.pw_gid)
        for name, manifest in self.manifests.items():
            self._models[(name, 0)] = load_model_bytes(manifest, self.config.supply)
            self._event("load", manifest, 0)
        for w in self.workers:
            self._spawn(w)
        self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout_s: float | None = None, workers: list[_Worker] | None = None) -> None:
        """Block until every worker answered its health check; raise on a permanent failure."""
        group = self.workers if workers is None else workers
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            fatal = [w for w in group if w.last_error.startswith("permanent") and not w.ready]
            if fatal:
                raise WorkerStartError("; ".join(f"{w.model.name}-{w.index}: {w.last_error}" for w in fatal))
            if all(w.ready for w in group):
                if workers is None:
                    self.publish_routes()
                return
            time.sleep(0.1)
        pending = [f"{w.model.name}-{w.index}" for w in group if not w.ready]
        raise WorkerStartError(f"workers not ready after {timeout_s or self.start_timeout_s:.0f}s: {pending}")

    # reload ----------------------------------------------------------------------------------
    def _event(self, kind: str, manifest: Manifest, generation: int, reason: str = "") -> None:
        event: dict[str, object] = {"event": kind, "model": manifest.name, "version": manifest.version,
                                    "sha256": manifest.sha256, "generation": generation}
        if reason:
            event["reason"] = reason
        self.events.append(event)
        (log.warning if kind in ("refuse", "quarantine") else log.info)(
            "model %s/%s: %s%s", manifest.name, manifest.version, kind, f" ({reason})" if reason else "")

    def publish_routes(self) -> None:
        """Write which sockets serve which model version, atomically."""
        with self._lock:
            models = {}
            for key, manifest in self.manifests.items():
                gen = self.generation[key]
                models[key] = {
                    "version": manifest.version, "generation": gen, "sha256": manifest.sha256,
                    "manifest": str(manifest.path),
                    "sockets": [str(w.socket) for w in self.workers if w.model.name == key and w.generation == gen],
                }
        tmp = self.runtime_dir / f".{ROUTES}.tmp"
        tmp.write_text(json.dumps({"models": models}, indent=1))
        os.replace(tmp, self.runtime_dir / ROUTES)

    def reload(self, config: Config) -> list[dict[str, object]]:
        """Swap in every configured model version that changed, each only once it is verified,
        admitted and its new workers are healthy; a refused or failing version leaves the serving
        one in place. Returns the events of this reload."""
        with self._reloading:  # one reload at a time: a second SIGHUP waits for the first
            return self._reload(config)

    def _reload(self, config: Config) -> list[dict[str, object]]:
        from gateway.registry.manifest import ManifestError, load_manifest

        first = len(self.events)
        units = config.units()
        known = {m.name.split("@", 1)[0] for m in self.config.models}
        for m in units:
            base = m.name.split("@", 1)[0]
            if base not in known:
                continue  # a new model needs a restart: the serving processes' policies and limits name them
            current = self.manifests.get(m.name)
            try:
                manifest = load_manifest(Path(config.models_root) / base / m.version)
                if current is not None and manifest.version == current.version and manifest.sha256 == current.sha256:
                    continue
                if (m.name, manifest.sha256) in self.quarantined:
                    raise ManifestError(f"{m.name}/{manifest.version} is quarantined (its worker died at load); "
                                        "change the model to try again")
                data = load_model_bytes(manifest, config.supply)
            except ManifestError as exc:
                self._event("refuse", _placeholder(m, current), self.generation.get(m.name, 0), str(exc))
                continue
            gen = self.generation.get(m.name, -1) + 1
            self._models[(m.name, gen)] = data
            self._event("load", manifest, gen)
            fresh = [_Worker(m, i, socket_path(self.runtime_dir, m.name, i, gen), gen) for i in range(m.workers)]
            with self._lock:
                self.workers.extend(fresh)
            try:
                self.wait_ready(workers=fresh)
            except WorkerStartError as exc:
                self._retire(fresh)
                self.quarantined.add((m.name, manifest.sha256))
                self._event("quarantine", manifest, gen, str(exc)[:500])
                continue
            old = [w for w in self.workers if w.model.name == m.name and w.generation != gen]
            with self._lock:
                self.manifests[m.name], self.generation[m.name] = manifest, gen
            self.publish_routes()
            self._event("swap" if current is not None else "add", manifest, gen)
            # In-flight requests on the old workers finish; then they go.
            threading.Timer(self.config.server.request_timeout_s + 2.0, self._retire, [old]).start()
        wanted = {m.name for m in units}
        for key in [k for k in self.manifests if k not in wanted and "@" in k]:  # an extra version dropped
            manifest = self.manifests[key]
            gone = [w for w in self.workers if w.model.name == key]
            with self._lock:
                del self.manifests[key], self.generation[key]
            self.publish_routes()
            self._event("remove", manifest, 0)
            threading.Timer(self.config.server.request_timeout_s + 2.0, self._retire, [gone]).start()
        return self.events[first:]

    def _retire(self, workers: list[_Worker]) -> None:
        with self._lock:
            self.workers = [w for w in self.workers if w not in workers]
        for w in workers:
            if w.proc and w.proc.poll() is None:
                w.proc.terminate()
                try:
                    w.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
            w.socket.unlink(missing_ok=True)
            self._models.pop((w.model.name, w.generation), None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for w in self.workers:
            if w.proc and w.proc.poll() is None:
                w.proc.terminate()
        deadline = time.monotonic() + 5
        for w in self.workers:
            if w.proc:
                try:
                    w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for w in self.workers:
            if w.proc and w.proc.poll() is None:
                out.setdefault(w.model.name, []).append(w.proc.pid)
        return out

    # internals -----------------------------------------------------------------------------
    def _command(self, w: _Worker) -> list[str]:
        m = w.model
        cmd = [
            sys.executable, "-m", "gateway.workers.worker",
            "--socket", str(w.socket), "--name", m.name, "--device", m.device,
            "--max-batch-size", str(m.max_batch_size),
            "--max-queue-delay-ms", str(m.max_queue_delay_ms),
            "--intra-op-threads", str(m.intra_op_threads),
            "--memory-limit-mb", str(m.memory_limit_mb),
        ]
        cmd += ["--cuda-tf32"] if m.cuda_tf32 else []
        cmd += ["--batch-buckets", m.batch_buckets]
        return cmd + (["--user", self.user] if self.user else [])

    def _environment(self, w: _Worker) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.runtime_dir),
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(max(1, w.model.intra_op_threads))}
        env.update({k: os.environ[k] for k in _PASS_ENV if k in os.environ})
        # The package must be importable by the worker's interpreter from where it is installed,
        # and so must whatever the gateway itself was given on PYTHONPATH (no secrets live there).
        paths = [str(Path(__file__).resolve().parents[2]), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = ":".join(paths)
        return env

    def _spawn(self, w: _Worker) -> None:
        w.socket.unlink(missing_ok=True)
        w.stderr_path = w.socket.with_suffix(".log")
        with open(w.stderr_path, "wb") as err:
            w.proc = subprocess.Popen(
                self._command(w), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                env=self._environment(w), close_fds=True, start_new_session=True,
            )
        assert w.proc.stdin is not None
        try:
            w.proc.stdin.write(self._models[(w.model.name, w.generation)])
            w.proc.stdin.close()
        except BrokenPipeError:
            pass
        w.started_at = time.monotonic()
        w.ready = False
        log.info("worker %s-%d started (pid %d)", w.model.name, w.index, w.proc.pid)

    def _ping(self, w: _Worker) -> bool:
        health = fetch_health(str(w.socket), timeout=2.0)
        return bool(health and health.get("ready"))

    def _exited(self, w: _Worker, code: int) -> None:
        tail = w.stderr_path.read_text(errors="replace")[-2000:].strip() if w.stderr_path.exists() else ""
        permanent = code in (3, 4)
        w.last_error = ("permanent: " if permanent else "") + f"exit code {code}" + (f": {tail}" if tail else "")
        w.proc, w.ready = None, False
        w.failures += 1
        backoff = min(self.max_backoff_s, 0.25 * 2 ** (w.failures - 1))
        w.next_start = time.monotonic() + backoff
        log.warning("worker %s-%d exited (%s); restarting in %.2fs", w.model.name, w.index, w.last_error, backoff)

    def _check(self, w: _Worker, now: float) -> None:
        if w.proc is None:
            if now >= w.next_start and not self._stop.is_set():
                w.restarts += 1
                self._spawn(w)
            return
        code = w.proc.poll()
        if code is not None:
            self._exited(w, code)
            return
        if self._ping(w):
            w.last_ok, w.ready = now, True
            if now - w.started_at > 30:
                w.failures = 0  # healthy for a while: the next crash starts the backoff afresh
            return
        limit = self.hang_timeout_s if w.ready else self.start_timeout_s
        if now - max(w.last_ok, w.started_at) > limit:
            log.warning("worker %s-%d unresponsive for %.0fs; killing it", w.model.name, w.index, limit)
            os.killpg(w.proc.pid, signal.SIGKILL)

    def _monitor(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                workers = list(self.workers)
            for w in workers:
                try:
                    self._check(w, now)
                except Exception:  # the monitor must outlive any one worker's trouble
                    log.exception("supervising worker %s-%d", w.model.name, w.index)
            self._stop.wait(self.ping_interval_s)


def _placeholder(m: ModelConfig, current: Manifest | None) -> Manifest:
    """What a refusal record names when the new version's manifest itself could not be read."""
    from dataclasses import replace

    if current is None:
        return Manifest(m.name.split("@", 1)[0], m.version, Path("."), (), (), "")
    return replace(current, version=m.version, sha256="")
