"""Several server processes on one port, each with its own listening socket (SO_REUSEPORT).

uvicorn's own `--workers` shares one listening socket between the processes, and whichever
process wakes first accepts every connection waiting: the 32 keep-alive clients of
bench/serve_load.py, connecting together, landed 31/1, 23/9 and 21/11 on two processes, so one
model copy did most of the work. With a socket per process the kernel spreads new connections
over the processes by their address hash (16/16, 17/15 and 17/15 for the same clients). The
supervisor (this process) forwards SIGTERM and SIGINT to the workers, waits for them to drain,
and replaces a worker that dies while serving.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

log = logging.getLogger("app.workers")

# A worker that dies sooner than this after starting is not restarted: the next one would
# most likely fail the same way (the CLI has already loaded the model once in this process).
MIN_UPTIME_S = 10.0


def supported() -> bool:
    """SO_REUSEPORT balances connections on Linux; elsewhere uvicorn's supervisor is used."""
    return hasattr(socket, "SO_REUSEPORT") and os.uname().sysname == "Linux"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuseport_socket(host: str, port: int, *, reuseaddr: bool = True) -> socket.socket:
    """A socket bound to (host, port) that other SO_REUSEPORT sockets of this user may share."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        if reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _port_is_free(host: str, port: int) -> None:
    """OSError (EADDRINUSE) when anyone listens on (host, port), or holds it as `claim_port`.

    A socket without SO_REUSEPORT cannot bind next to a listening one, whoever owns it, so this
    also sees the workers of another instance of this service, which the kernel would
    otherwise let us join (same user, SO_REUSEPORT): clients would get either at random.
    SO_REUSEADDR lets it bind over connections of an earlier server left in TIME_WAIT."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def claim_port(host: str, port: int) -> socket.socket:
    """The supervisor's hold on (host, port) while it runs: bound, never listening, so the
    workers' sockets receive every connection. OSError when the port is in use.

    The hold sets SO_REUSEPORT but not SO_REUSEADDR: our workers (SO_REUSEPORT, same user) may
    bind next to it, and `_port_is_free` in another instance fails against it even before our
    workers listen (while their models load). Two instances started in the same instant may
    both pass the check: the kernel offers no atomic test-and-hold for a shared port."""
    _port_is_free(host, port)
    try:
        return reuseport_socket(host, port, reuseaddr=False)
    except OSError:
        # Connections of an earlier server without SO_REUSEPORT (one process: plain uvicorn)
        # left in TIME_WAIT refuse this bind for up to a minute; serve anyway, with a hold
        # that another instance's check passes until our workers listen, rather than send the
        # user away from a free port.
        return reuseport_socket(host, port)


def exit_cleanly_after_drain() -> None:
    """uvicorn re-raises the SIGTERM/SIGINT that stopped it once it has drained; with the
    default handlers that ends the process by the signal (-15), or with a KeyboardInterrupt
    traceback. Ignoring the re-raised signal lets a graceful shutdown exit 0."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def _serve(host: str, port: int, uvicorn_options: dict[str, Any]) -> None:
    """One worker process: its own socket (bound; uvicorn listens on it once the model is
    warm), then uvicorn on the app built from APP_*."""
    sock = reuseport_socket(host, port)
    exit_cleanly_after_drain()
    config = uvicorn.Config("app.main:worker_app_from_env", factory=True, **uvicorn_options)
    uvicorn.Server(config).run(sockets=[sock])


def _mark_dead(pid: int | None) -> None:
    """Drop a finished worker's live gauges (queue depth) from the summed /metrics."""
    if pid is not None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run_workers(
    count: int, host: str, port: int, graceful_shutdown_s: float, **uvicorn_options: Any
) -> int:
    """Serve with `count` processes until SIGTERM/SIGINT; 0 after a clean drain, 1 when
    workers kept failing. OSError when the port cannot be bound (reported by the CLI)."""
    guard = claim_port(host, port)
    context = multiprocessing.get_context("spawn")  # no forked torch or thread state
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}

    def start(index: int) -> tuple[multiprocessing.process.BaseProcess, float]:
        process = context.Process(
            target=_serve, args=(host, port, uvicorn_options), name=f"worker-{index}"
        )
        process.start()
        log.info("worker %d started (pid %s)", index, process.pid)
        return process, time.monotonic()

    workers = [start(i) for i in range(count)]
    failed = False
    try:
        while not stop.wait(0.5):
            for index, (process, started) in enumerate(workers):
                if process.is_alive():
                    continue
                _mark_dead(process.pid)
                if time.monotonic() - started < MIN_UPTIME_S:
                    log.error(
                        "worker %d exited with code %s right after starting; stopping",
                        index,
                        process.exitcode,
                    )
                    failed = True
                    stop.set()
                    break
                log.warning(
                    "worker %d exited with code %s; starting another", index, process.exitcode
                )
                workers[index] = start(index)
    finally:
        for process, _ in workers:  # each drains its in-flight requests, then exits
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + graceful_shutdown_s + 15
        for process, _ in workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
            _mark_dead(process.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        guard.close()
    return 1 if failed else 0
