"""Serving processes: one or several, each on its own ``SO_REUSEPORT`` socket, and the file
descriptors each may spend on connections."""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import socket
import time
from typing import Any

import uvicorn

from gateway.config import Config

__all__ = ["ServingProcesses", "connection_budget", "reuse_port_socket"]

log = logging.getLogger("gateway.server")

RESERVED_FILES = 256
"""Descriptors kept back from client connections: audit files, the supervisor's pings, Redis,
the identity provider, decoder pipes, logs."""


def connection_budget(config: Config) -> int:
    """How many client connections (established and in their handshake) one serving process may
    hold: its descriptor limit (raised to the hard limit) less a reserve for everything else,
    including a connection to every worker for each request it may have in flight. Client
    connections can then never starve the supervisor's pings or the gateway's own connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    to_workers = sum(m.workers * m.max_inflight for _, m in config.units())
    budget = soft - RESERVED_FILES - to_workers
    wanted_connections = config.server.max_connections
    if budget < wanted_connections:
        budget = max(64, budget)
        log.warning("server.max_connections %d does not fit in %d file descriptors (less %d reserved and %d for "
                    "worker connections): at most %d connections per serving process", wanted_connections, soft,
                    RESERVED_FILES, to_workers, budget)
        return budget
    return wanted_connections


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket of its own for one serving process (``SO_REUSEPORT``).

    With one socket shared by every process (uvicorn's multi-process mode), connections that
    arrive together are often all accepted by one process while the others idle; with a socket
    each, the kernel spreads new connections across the processes.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _serving_process(ucfg: Any, parent_pid: int, index: int) -> None:
    from gateway.workers.isolation import die_with_parent

    die_with_parent(parent_pid)
    os.environ["GATEWAY_PROCESS_INDEX"] = str(index)  # names this process's audit chain
    sock = reuse_port_socket(ucfg.host, ucfg.port, ucfg.backlog)
    uvicorn.Server(ucfg).run(sockets=[sock])


class ServingProcesses:
    """``count`` serving processes, each on its own ``SO_REUSEPORT`` socket; a dead one is
    restarted (after a second), and all are stopped when this process is told to stop."""

    def __init__(self, ucfg: Any, count: int) -> None:
        self.ucfg = ucfg
        self.count = count
        self.context = multiprocessing.get_context("spawn")

    def _start(self, index: int) -> multiprocessing.process.BaseProcess:
        proc = self.context.Process(target=_serving_process, args=(self.ucfg, os.getpid(), index),
                                    name=f"gateway-serve-{index}")
        proc.start()
        return proc

    def run(self) -> None:
        procs = [self._start(i) for i in range(self.count)]
        try:
            while True:
                time.sleep(1.0)
                for i, proc in enumerate(procs):
                    if not proc.is_alive():
                        log.warning("serving process %s exited (%s); restarting it", proc.pid, proc.exitcode)
                        procs[i] = self._start(i)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
