"""Starts, watches and restarts worker processes (the shape of uvicorn's multiprocess supervisor).

Each worker is one process on its own Unix socket. The gateway creates that socket (bound in the
private runtime directory, which only the gateway can write) and hands the worker the bound
descriptor; the worker calls ``listen()`` itself, after dropping its privileges, so the kernel's
peer credentials of the socket name the worker's own process and user (what the serving processes
verify on every connection). Nothing a worker can write is read by the gateway.

Every worker gets a scrubbed environment (no gateway secrets), an empty working directory, the
verified model bytes on its standard input, and, when the gateway runs as root, a user id of its
own (``server.worker_uid_base`` + slot), so that workers cannot signal or trace each other. A
monitor thread pings each worker's ``/health``; a worker that exited or stopped answering is
killed and restarted with exponential backoff while the others keep serving. A ping this process
could not even attempt (no file descriptor left, say) is not held against the worker.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import Config, ModelConfig
from gateway.units import Unit
from gateway.workers.exits import ExitCode
from gateway.workers.local import fetch_health

__all__ = ["ProcessMonitor", "WorkerProcess", "WorkerStartError", "socket_path"]

log = logging.getLogger("gateway.supervisor")

# Variables a worker may inherit: what the CUDA stack and the dynamic loader need, nothing else.
_PASS_ENV = ("LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TZ", "OPENBLAS_CORETYPE")


class WorkerStartError(RuntimeError):
    """A worker failed in a way a restart will not fix (bad device, model that does not load)."""


def socket_path(runtime_dir: str | Path, unit: Unit, index: int, generation: int = 0) -> Path:
    """A worker's socket; a reloaded unit's workers get a new generation (and new sockets)."""
    stem = f"{unit.key}-{index}" if generation == 0 else f"{unit.key}-g{generation}-{index}"
    return Path(runtime_dir) / f"{stem}.sock"


@dataclass(eq=False)
class WorkerProcess:
    unit: Unit
    settings: ModelConfig
    index: int
    socket: Path
    generation: int = 0
    uid: int | None = None
    """The user the worker drops to (None: it keeps this process's)."""
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    last_ok: float = 0.0
    ready: bool = False
    restarts: int = 0
    last_error: str = ""
    stderr_path: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return f"{self.unit.key}-{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class ProcessMonitor:
    ping_interval_s = 0.5
    hang_timeout_s = 10.0
    start_timeout_s = 120.0
    max_backoff_s = 10.0

    def __init__(self, config: Config, runtime_dir: Path, model_bytes: Callable[[WorkerProcess], bytes],
                 on_spawn: Callable[[], None]) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.model_bytes = model_bytes
        self.on_spawn = on_spawn
        """Called after a worker (re)starts: its process, and so its credentials, changed."""
        self.root = os.geteuid() == 0
        self.helper = "" if self.root else config.server.worker_exec
        """Not root: the image's set-user-ID helper starts each worker as its own user."""
        self.drops = self.root or bool(self.helper)
        user = config.server.worker_user if self.drops else ""
        self.gid = pwd.getpwnam(user).pw_gid if user else None
        self.shared_uid = pwd.getpwnam(user).pw_uid if user else None
        self.workers: list[WorkerProcess] = []
        self.lock = threading.Lock()  # guards self.workers against the monitor thread
        self._slots: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """The runtime directory (the gateway's alone) and the workers' empty working directory."""
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)
        empty = self.empty_dir
        empty.mkdir(exist_ok=True)
        os.chmod(empty, 0o111)  # enter only: nothing to list, read or write

    @property
    def empty_dir(self) -> Path:
        return self.runtime_dir / "empty"

    def create(self, unit: Unit, settings: ModelConfig, generation: int) -> list[WorkerProcess]:
        """New workers for ``unit``; the monitor thread starts them. Only that long-lived thread
        starts workers: a worker's parent-death signal fires when the *thread* that forked it ends."""
        fresh = [WorkerProcess(unit, settings, i, socket_path(self.runtime_dir, unit, i, generation), generation,
                               self._allocate_uid()) for i in range(settings.workers)]
        with self.lock:
            self.workers.extend(fresh)
        return fresh

    def start(self) -> None:
        self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, group: list[WorkerProcess], timeout_s: float | None = None) -> None:
        """Block until every worker of ``group`` answered its health check; raise on a permanent failure."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while time.monotonic() < deadline:
            fatal = [w for w in group if w.last_error.startswith("permanent") and not w.ready]
            if fatal:
                raise WorkerStartError("; ".join(f"{w.name}: {w.last_error}" for w in fatal))
            if all(w.ready for w in group):
                return
            time.sleep(0.1)
        pending = [w.name for w in group if not w.ready]
        raise WorkerStartError(f"workers not ready after {timeout_s or self.start_timeout_s:.0f}s: {pending}")

    def retire(self, workers: list[WorkerProcess]) -> None:
        with self.lock:
            self.workers = [w for w in self.workers if w not in workers]
        for w in workers:
            self._terminate(w)
            w.socket.unlink(missing_ok=True)
            if self.drops and w.uid is not None and w.uid != self.shared_uid:
                self._slots.discard(w.uid - self.config.server.worker_uid_base)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for w in self.workers:
            self._signal(w, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for w in self.workers:
            if w.proc:
                try:
                    w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._signal(w, signal.SIGKILL)
                    try:
                        w.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:  # never hang the shutdown: it dies with us (PDEATHSIG)
                        log.error("worker %s (pid %d) did not stop", w.name, w.proc.pid)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def pids(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for w in self.workers:
            if w.proc and w.proc.poll() is None:
                out.setdefault(w.unit.key, []).append(w.proc.pid)
        return out

    # internals ---------------------------------------------------------------------------------
    def _allocate_uid(self) -> int | None:
        if not self.drops or self.shared_uid is None:
            return None
        base = self.config.server.worker_uid_base
        if not base:
            return self.shared_uid
        slot = next(i for i in range(len(self._slots) + 1) if i not in self._slots)
        self._slots.add(slot)
        return base + slot

    def _command(self, w: WorkerProcess, fd: int) -> list[str]:
        m = w.settings
        # -P: the working directory is not put on the import path.
        cmd = [
            sys.executable, "-P", "-m", "gateway.workers.worker",
            "--listen-fd", str(fd), "--name", w.unit.key, "--model-version", m.version, "--device", m.device,
            "--max-batch-size", str(m.max_batch_size),
            "--max-queue-delay-ms", str(m.max_queue_delay_ms),
            "--intra-op-threads", str(m.intra_op_threads),
            "--memory-limit-mb", str(m.memory_limit_mb),
            "--batch-buckets", m.batch_buckets,
        ]
        cmd += ["--cuda-tf32"] if m.cuda_tf32 else []
        cmd += [] if m.intra_op_spinning else ["--no-intra-op-spinning"]
        if self.helper and w.uid is not None:  # the helper drops to the user and runs the same module
            return [self.helper, str(w.uid), "--", *cmd[4:]]
        if w.uid is not None and self.gid is not None:
            cmd += ["--uid", str(w.uid), "--gid", str(self.gid)]
        return cmd

    def _environment(self, w: WorkerProcess) -> dict[str, str]:
        # No home: libraries that cache under ~ (onnxruntime makes ~/.cache) find none to write to.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": str(max(1, w.settings.intra_op_threads))}
        env.update({k: os.environ[k] for k in _PASS_ENV if k in os.environ})
        # The package must be importable by the worker's interpreter from where it is installed,
        # and so must whatever the gateway itself was given on PYTHONPATH (no secrets live there).
        paths = [str(Path(__file__).resolve().parents[2]), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = ":".join(paths)
        return env

    def _bound_socket(self, w: WorkerProcess) -> socket.socket:
        """The worker's socket, bound here (so the file is the gateway's), to be listened on by the worker."""
        w.socket.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(w.socket))
        os.chmod(w.socket, 0o600)
        return sock

    def _spawn(self, w: WorkerProcess) -> None:
        sock = self._bound_socket(w)
        w.stderr_path = w.socket.with_suffix(".log")
        try:
            with open(w.stderr_path, "wb") as err:
                w.proc = subprocess.Popen(
                    self._command(w, sock.fileno()), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                    env=self._environment(w), cwd=self.empty_dir, close_fds=True, pass_fds=(sock.fileno(),),
                    start_new_session=True,
                )
        finally:
            sock.close()
        assert w.proc.stdin is not None
        try:
            w.proc.stdin.write(self.model_bytes(w))
            w.proc.stdin.close()
        except BrokenPipeError:
            pass
        w.started_at = time.monotonic()
        w.ready = False
        log.info("worker %s started (pid %d%s)", w.name, w.proc.pid, f", uid {w.uid}" if w.uid is not None else "")
        self.on_spawn()

    def _signal(self, w: WorkerProcess, sig: signal.Signals) -> None:
        """TERM or KILL a worker. A worker started by ``server.worker_exec`` runs as another user,
        whom only the helper may signal (its own child workers, nothing else)."""
        if w.proc is None or w.proc.poll() is not None:
            return
        if self.helper:
            try:
                done = subprocess.run([self.helper, "--signal", str(w.proc.pid), sig.name.removeprefix("SIG")],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("cannot signal worker %s through %s: %s", w.name, self.helper, exc)
                return
            if done.returncode not in (0, 3):  # 3: it had already exited
                log.error("cannot signal worker %s: %s", w.name, done.stderr.strip() or f"exit {done.returncode}")
        elif sig == signal.SIGKILL:
            os.killpg(w.proc.pid, signal.SIGKILL)
        else:
            w.proc.send_signal(sig)

    def _terminate(self, w: WorkerProcess) -> None:
        if w.proc and w.proc.poll() is None:
            self._signal(w, signal.SIGTERM)
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._signal(w, signal.SIGKILL)

    def _ping(self, w: WorkerProcess) -> bool | None:
        """True or False by the worker's answer; None when this process could not ask."""
        try:
            health = fetch_health(str(w.socket), timeout=2.0)
        except OSError as exc:
            log.warning("cannot ping worker %s: %s (not held against it)", w.name, exc.strerror or exc)
            return None
        return bool(health and health.get("ready"))

    def _exited(self, w: WorkerProcess, code: int) -> None:
        tail = w.stderr_path.read_text(errors="replace")[-2000:].strip() if w.stderr_path.exists() else ""
        permanent = ExitCode.permanent(code)
        w.last_error = ("permanent: " if permanent else "") + f"exit code {code}" + (f": {tail}" if tail else "")
        w.proc, w.ready = None, False
        w.failures += 1
        backoff = min(self.max_backoff_s, 0.25 * 2 ** (w.failures - 1))
        w.next_start = time.monotonic() + backoff
        log.warning("worker %s exited (%s); restarting in %.2fs", w.name, w.last_error, backoff)

    def _check(self, w: WorkerProcess, now: float) -> None:
        if w.proc is None:
            if now >= w.next_start and not self._stop.is_set():
                w.restarts += 1 if w.started_at else 0
                self._spawn(w)
            return
        code = w.proc.poll()
        if code is not None:
            self._exited(w, code)
            return
        answered = self._ping(w)
        if answered is None:
            w.last_ok = max(w.last_ok, now)  # unknown: this process's trouble, not the worker's
            return
        if answered:
            w.last_ok, w.ready = now, True
            if now - w.started_at > 30:
                w.failures = 0  # healthy for a while: the next crash starts the backoff afresh
            return
        limit = self.hang_timeout_s if w.ready else self.start_timeout_s
        if now - max(w.last_ok, w.started_at) > limit:
            log.warning("worker %s unresponsive for %.0fs; killing it", w.name, limit)
            self._signal(w, signal.SIGKILL)

    def _monitor(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self.lock:
                workers = list(self.workers)
            for w in workers:
                try:
                    self._check(w, now)
                except Exception:  # the monitor must outlive any one worker's trouble
                    log.exception("supervising worker %s", w.name)
            self._stop.wait(self.ping_interval_s)
