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

from app.protocol import guarded_protocol
from app.settings import Settings

log = logging.getLogger("app.workers")

# A worker that dies sooner than this after starting is not restarted: the next one would
# most likely fail the same way (the CLI has already loaded the model once in this process).
MIN_UPTIME_S = 10.0


def supported() -> bool:
    """SO_REUSEPORT balances connections on Linux; elsewhere uvicorn's supervisor is used."""
    return hasattr(socket, "SO_REUSEPORT") and os.uname().sysname == "Linux"


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that other sockets of this user may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


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
    protocol = guarded_protocol(Settings().read_timeout_s)  # APP_*, as the supervisor set them
    config = uvicorn.Config(
        "app.main:worker_app_from_env", factory=True, http=protocol, **uvicorn_options
    )
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
    # Bound, never listening: a port held by another program fails here, in one line, and the
    # workers' sockets (which listen) receive every connection.
    guard = reuseport_socket(host, port)
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
