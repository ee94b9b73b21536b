"""Several server processes on one port, each with its own listening socket (SO_REUSEPORT).

uvicorn's own `--workers` shares one listening socket between the processes, and whichever
process wakes first accepts every connection waiting: the 32 keep-alive clients of
bench/serve_load.py, connecting together, landed 31/1, 23/9 and 21/11 on two processes, so one
model copy did most of the work. With a socket per process the kernel spreads new connections
over the processes by their address hash (16/16, 17/15 and 17/15 for the same clients). The
supervisor (this process) forwards SIGTERM and SIGINT to the workers, waits for them to drain,
and replaces a worker that dies (see the restart policy below); a worker whose supervisor dies,
even by SIGKILL, drains and exits too.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from app.protocol import guarded_protocol
from app.settings import Settings
from training.interrupts import stop_status

log = logging.getLogger("app.workers")

# Restart policy. A worker is ready once it listens (its model is warm).
# - One that exits before it is ready, at the service's start, stops the service (exit 1):
#   settings, a model or a memory size that fail one start fail the next the same way.
# - One that exits after it was ready is replaced at once: what ended it (an OOM kill, a crash
#   on one request) need not come again, and the others serve meanwhile.
# - A replacement that exits before it is ready is started again after a pause that doubles
#   (1, 2, 4, 8 s), the others still serving; after MAX_FAILED_RESTARTS such exits in a row the
#   service stops (exit 1), rather than loading a model that keeps failing forever.
FIRST_RESTART_DELAY_S = 1.0
MAX_FAILED_RESTARTS = 5

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def supported() -> bool:
    """SO_REUSEPORT balances connections on Linux; elsewhere uvicorn's supervisor is used."""
    return hasattr(socket, "SO_REUSEPORT") and os.uname().sysname == "Linux"


def addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, Any]]:
    """Each address (family, sockaddr) that (host, port) names, as one uvicorn process (asyncio's
    create_server) binds them: a hostname's IPv4 and IPv6 addresses alike, and both families'
    "any" address for a blank host. socket.gaierror when the host does not resolve."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))


class Sockets(list[socket.socket]):
    """The sockets of one (host, port), one per address; they close together."""

    def close(self) -> None:
        for sock in self:
            sock.close()

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _bind_all(host: str, port: int, options: list[tuple[int, int]]) -> Sockets:
    """A socket per address of (host, port), each with the SOL_SOCKET `options` set, bound.

    The family of a literal address was once guessed from a ':' in it, so a hostname with only
    IPv6 addresses did not bind (nor did a port in use at a hostname's second address show).
    IPv6 sockets are IPv6 only, as asyncio makes them: the IPv4 address is bound on its own,
    and `--host ::` means the same with one process and with several. An address whose family
    this machine lacks (no such socket, or EADDRNOTAVAIL: IPv6 turned off, while a blank host
    always names `::` too) is left out, as asyncio does; its error is raised if no address is
    left."""
    bound = Sockets()
    missing: OSError | None = None
    try:
        for family, sockaddr in addresses(host, port):
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                missing = missing or exc
                continue
            bound.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            for name, value in options:
                sock.setsockopt(socket.SOL_SOCKET, name, value)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                missing = missing or exc
                bound.pop().close()
        if not bound and missing is not None:
            raise missing
    except OSError:
        bound.close()
        raise
    return bound


def reuseport_sockets(host: str, port: int, *, reuseaddr: bool = True) -> Sockets:
    """Sockets bound to (host, port) that other SO_REUSEPORT sockets of this user may share."""
    options = [(socket.SO_REUSEPORT, 1)]
    if reuseaddr:
        options.append((socket.SO_REUSEADDR, 1))
    return _bind_all(host, port, options)


def check_port_free(host: str, port: int) -> None:
    """OSError (EADDRINUSE) when anyone listens on (host, port), or holds it as `claim_port`;
    socket.gaierror when the host does not resolve.

    A socket without SO_REUSEPORT cannot bind next to a listening one, whoever owns it, so this
    also sees the workers of another instance of this service, which the kernel would
    otherwise let us join (same user, SO_REUSEPORT): clients would get either at random.
    SO_REUSEADDR lets it bind over connections of an earlier server left in TIME_WAIT."""
    _bind_all(host, port, [(socket.SO_REUSEADDR, 1)]).close()


def claim_port(host: str, port: int) -> Sockets:
    """The supervisor's hold on (host, port) while it runs: bound, never listening, so the
    workers' sockets receive every connection. OSError when the port is in use.

    The hold sets SO_REUSEPORT but not SO_REUSEADDR: our workers (SO_REUSEPORT, same user) may
    bind next to it, and `check_port_free` in another instance fails against it even before our
    workers listen (while their models load). Two instances started in the same instant may
    both pass the check: the kernel offers no atomic test-and-hold for a shared port."""
    check_port_free(host, port)
    try:
        return reuseport_sockets(host, port, reuseaddr=False)
    except OSError:
        # Connections of an earlier server without SO_REUSEPORT (one process: plain uvicorn)
        # left in TIME_WAIT refuse this bind for up to a minute; serve anyway, with a hold
        # that another instance's check passes until our workers listen, rather than send the
        # user away from a free port.
        return reuseport_sockets(host, port)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def note_stops() -> list[int]:
    """From here on, SIGTERM and SIGINT are noted in the list returned instead of acted on,
    whenever no one else handles them:
    - before uvicorn (or the supervisor) installs its own handlers, which uvicorn does only once
      its event loop runs: `exit_if_stopped`, called once they are in place, ends the process
      for a stop that came in between (ignored, it left a worker loading its model and serving
      after the supervisor had told it to stop, and the supervisor waiting out the drain time);
    - after uvicorn restores these handlers: it re-raises the signal that stopped it once it has
      drained, and the default handlers would end the process by the signal (-15), or with a
      KeyboardInterrupt traceback. Noted, a graceful shutdown exits 0."""
    received: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _: received.append(signum))
    return received


def exit_if_stopped(stops: list[int]) -> None:
    """End the process if `note_stops` noted a stop: nothing is served yet, and the exit status
    says what stopped it (130 for Ctrl-C, as during the model's load; 143 for SIGTERM)."""
    if stops:
        raise SystemExit(stop_status(stops[0]))


def stop_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent (pid `parent`) dies, SIGKILL
    included, so that it drains and exits rather than serve on, orphaned. Linux only."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        log.warning("no prctl here: this worker will outlive a supervisor killed by SIGKILL")
        return
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (%s): this worker will outlive a supervisor killed "
            "by SIGKILL",
            os.strerror(ctypes.get_errno()),
        )
        return
    if os.getppid() != parent:  # it died before the request, which then never fires
        log.warning("the supervisor (pid %d) is gone; this worker stops", parent)
        os.kill(os.getpid(), signal.SIGTERM)


def _serve(
    host: str, port: int, uvicorn_options: dict[str, Any], ready: ctypes.c_bool, supervisor: int
) -> None:
    """One worker process: its own socket (bound; uvicorn listens on it once the model is
    warm), then uvicorn on the app built from APP_*; `ready` is set once it listens."""
    stops = note_stops()
    # Blocked until now by the supervisor (see `launch`): a stop that came meanwhile is noted.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    exit_if_stopped(stops)
    sockets = reuseport_sockets(host, port)

    def build_app() -> Any:
        # uvicorn calls this factory once its own handlers are in place: a later stop drains
        # the worker; one before (while uvicorn set up its event loop) is noted in `stops`.
        exit_if_stopped(stops)
        from app.main import worker_app_from_env

        served = worker_app_from_env()  # quick: the model loads at startup, after this
        stop_with_parent(supervisor)  # here, where the SIGTERM it may send drains the worker
        return served

    async def listening() -> None:  # uvicorn calls it right after startup, then every 30 s
        ready.value = True

    protocol = guarded_protocol(Settings().read_timeout_s)  # APP_*, as the supervisor set them
    config = uvicorn.Config(
        build_app, factory=True, callback_notify=listening, http=protocol, **uvicorn_options
    )
    uvicorn.Server(config).run(sockets=sockets)


@dataclass
class _Slot:
    """One of the workers: its current process, and how the processes before it ended."""

    index: int
    process: BaseProcess
    ready: ctypes.c_bool  # in shared memory: set by the process once it listens
    served: bool = False  # a process of this slot got to listen
    failures: int = 0  # replacements in a row that exited before they were ready
    announced: bool = False  # its current process was logged as ready
    restart_at: float | None = None  # time.monotonic() of the next start, once process exited


def _ended(code: int | None) -> str:
    """How a worker's process ended, for the log: its exit status, or the signal behind it."""
    try:
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"  # SIGKILL: maybe out of memory
        if code in [stop_status(s) for s in STOP_SIGNALS]:  # its own handlers' exit
            return f"was stopped by {signal.Signals(code - 128).name} (exit code {code})"
    except ValueError:  # a signal without a name here
        pass
    return f"exited with code {code}"


def _restart_delay(slot: _Slot, code: int | None, ready: bool) -> float | None:
    """Seconds before the slot's next process starts, after one that exited with `code`;
    None to stop the service (the restart policy above)."""
    ended = _ended(code)
    if ready:
        slot.served, slot.failures = True, 0
        log.warning("worker %d %s; starting another", slot.index, ended)
        return 0.0
    if not slot.served:
        if code in [stop_status(s) for s in STOP_SIGNALS]:
            # A stop sent to this worker alone (the service's own goes through the supervisor):
            # the service did not start whole, and no failure of its own says the next would
            # fail too.
            log.error("worker %d %s before it was ready, at startup; stopping", slot.index, ended)
        else:
            log.error(
                "worker %d %s before it was ready, at startup; stopping, as the next would fail "
                "the same way (see the error above, or check free memory)",
                slot.index,
                ended,
            )
        return None
    slot.failures += 1
    if slot.failures >= MAX_FAILED_RESTARTS:
        log.error(
            "worker %d %s before it was ready, %d times in a row; stopping",
            slot.index,
            ended,
            slot.failures,
        )
        return None
    delay = FIRST_RESTART_DELAY_S * 2 ** (slot.failures - 1)
    log.warning(
        "worker %d %s before it was ready; starting another in %g s", slot.index, ended, delay
    )
    return delay


def _mark_dead(pid: int | None) -> None:
    """Drop a finished worker's live gauges (queue depth) from the summed /metrics."""
    if pid is not None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run_workers(
    count: int,
    host: str,
    port: int,
    graceful_shutdown_s: float,
    stops: list[int] | None = None,
    **uvicorn_options: Any,
) -> int:
    """Serve with `count` processes until SIGTERM/SIGINT; 0 after a clean drain, 1 when
    workers kept failing. OSError when the port cannot be bound (reported by the CLI).
    `stops`: the list of `note_stops`, if the caller noted stops until now; if it holds one,
    no worker starts, and the status is the signal's (130 for Ctrl-C)."""
    guard = claim_port(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port} (Ctrl-C to stop)"
    context = multiprocessing.get_context("spawn")  # no forked torch or thread state
    received = stops if stops is not None else []
    # A list, not a threading.Event: the handler runs on the main thread between two bytecodes,
    # and Event.set takes the lock that the main thread's Event.wait may hold right then; the
    # supervisor deadlocked (1 in 16 SIGTERMs sent as the workers started), workers serving on.
    previous = {
        s: signal.signal(s, lambda signum, _: received.append(signum)) for s in STOP_SIGNALS
    }

    def launch(index: int) -> tuple[BaseProcess, ctypes.c_bool]:
        # No lock (an Event has one): a worker killed while it holds it would hang this loop.
        ready = context.RawValue(ctypes.c_bool, False)
        process = context.Process(
            target=_serve,
            args=(host, port, uvicorn_options, ready, os.getpid()),
            name=f"worker-{index}",
        )
        # The child inherits the signal mask (through fork and exec), not the handlers: with
        # the stop signals blocked until `_serve` installs its handlers, a Ctrl-C to the
        # process group during the child's start-up (Python's site, the imports) waits for
        # them, where it raised a KeyboardInterrupt, with a traceback. This process gets its
        # own once the mask is restored. (Started later, multiprocessing's resource tracker
        # would unblock them in the middle of start().)
        resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()  # from the main thread: the death signal follows the starting thread
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        log.info("worker %d started (pid %s)", index, process.pid)
        return process, ready

    def check(slot: _Slot) -> bool:
        """Replace the slot's process once it exited, when the policy says; False: stop."""
        if slot.restart_at is None:
            if slot.process.is_alive():
                if slot.ready.value and not slot.announced:
                    # The address, as one uvicorn process logs it: with sockets of their own,
                    # the workers' uvicorn logs none.
                    slot.announced = True
                    log.info("worker %d ready on %s", slot.index, url)
                return True
            _mark_dead(slot.process.pid)
            delay = _restart_delay(slot, slot.process.exitcode, slot.ready.value)
            if delay is None:
                return False
            slot.restart_at = time.monotonic() + delay
        if time.monotonic() >= slot.restart_at:
            slot.process, slot.ready = launch(slot.index)
            slot.restart_at, slot.announced = None, False
        return True

    slots = [] if received else [_Slot(i, *launch(i)) for i in range(count)]
    failed = False
    try:
        while not received:
            if not all(check(slot) for slot in slots):
                failed = True
                break
            time.sleep(0.1)  # a signal does not cut it short (PEP 475): noticed within 0.1 s
    finally:
        for slot in slots:  # each drains its in-flight requests, then exits
            if slot.process.is_alive() and slot.process.pid is not None:
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + graceful_shutdown_s + 15
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.error("worker pid %s did not stop in time; killing it", slot.process.pid)
                slot.process.kill()
                slot.process.join()
            _mark_dead(slot.process.pid)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        guard.close()
    if failed:
        return 1
    return stop_status(received[0]) if received and not slots else 0
