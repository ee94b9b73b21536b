"""Several server processes (`--workers 2`): connections spread over them, every one serves,
/metrics sums them all, a worker that dies is replaced, SIGTERM drains them all; a port
already taken (by another program or another instance of this service) is a one-line error."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import workers
from tests.app.images import jpeg
from tests.app.support import free_port, parse_metrics, sample
from tests.helpers import ROOT, cli_env, run_cli


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _workers(pid: int) -> list[int]:
    """The server's worker processes (not multiprocessing's resource tracker)."""
    return [
        kid for kid in _children(pid) if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes()
    ]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing: a worker starting opens many
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _accepted_by(port: int, client_ports: set[int]) -> dict[int, str]:
    """client port -> inode of the server-side socket, for connections to `port` (IPv4)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in client_ports:
            out[int(remote.split(":")[1], 16)] = inode
    return out


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port`."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:  # TCP_LISTEN
            listening.add(fields[9])
    return bool(listening & _socket_inodes(pid))


def _spread_of_connections(pid: int, port: int, count: int) -> list[int]:
    """Open `count` connections at once and keep them: how many each worker process accepted
    (each server-side socket found by its inode among the worker's open files)."""
    workers = _workers(pid)
    conns = [socket.socket() for _ in range(count)]
    try:
        for conn in conns:  # a burst, as a pool of keep-alive clients opens them
            conn.setblocking(False)
            conn.connect_ex(("127.0.0.1", port))
        ports = {conn.getsockname()[1] for conn in conns}
        deadline = time.time() + 30
        while True:  # until the workers' event loops have accepted them all
            inodes = _accepted_by(port, ports)
            owned = {w: _socket_inodes(w) for w in workers}
            spread = sorted(sum(i in owned[w] for i in inodes.values()) for w in workers)
            if sum(spread) == count or time.time() > deadline:
                return spread
            time.sleep(0.1)
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def _two_workers(artifact: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m app --workers 2` on `port`, given once both workers listen (their models
    warm); its whole process group killed after, whatever became of the supervisor."""
    args = [
        sys.executable, "-m", "app", "--checkpoint", str(artifact), "--port", str(port),
        "--device", "cpu", "--precision", "fp32", "--workers", "2", "--threads", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 120
        while len(kids := _workers(process.pid)) < 2 or not all(_listening(w, port) for w in kids):
            assert process.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.3)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # none left: the test stopped them all
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(60)


@pytest.mark.slow
def test_two_workers_serve_report_together_and_recover(artifact: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with _two_workers(artifact, port, log) as process:
        # Each spawned worker logs like the single process does (it used to log nothing of
        # its own: logging was configured in the parent only).
        assert log.read_text().count("INFO app: serving") == 2, log.read_text()
        # Each process listens on its own socket (SO_REUSEPORT): connections opened together
        # spread over both, instead of all going to whichever process woke first.
        spread = _spread_of_connections(process.pid, port, 16)
        assert len(spread) == 2 and sum(spread) == 16 and min(spread) >= 2, spread  # ~1 in 2,000
        before = parse_metrics(httpx.get(url + "/metrics").text)
        sent = 8
        for seed in range(sent):  # never 503 'loading': a worker still warming is not listening
            with httpx.Client() as client:  # new connections spread over the processes
                response = client.post(
                    url + "/predict", files={"file": ("x.jpg", jpeg(seed=seed))}, timeout=30
                )
            assert response.status_code == 200, response.text
        after = parse_metrics(httpx.get(url + "/metrics").text)
        served = sample(
            after, "http_requests_total", endpoint="/predict", method="POST", status="200"
        ) - sample(before, "http_requests_total", endpoint="/predict", method="POST", status="200")
        assert served == sent  # summed over both processes, whichever one answered the scrape
        assert (
            sample(after, "inference_batch_size_count")
            - sample(before, "inference_batch_size_count")
            == sent
        )

        # A worker that dies while serving is replaced, and the service keeps answering.
        victim, *survivors = _workers(process.pid)
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 90

        def replacement(dead: int) -> int:
            while len(current := _workers(process.pid)) < 2 or dead in current:
                assert process.poll() is None, log.read_text()
                assert time.time() < deadline, log.read_text()
                time.sleep(0.1)
            [newcomer] = set(current) - set(survivors)
            return newcomer

        # Its replacement killed too while it loads (as an OOM kill would) is replaced again
        # after a pause: the supervisor used to stop the whole service, the survivor included.
        first = replacement(victim)
        os.kill(first, signal.SIGKILL)
        newcomer = replacement(first)

        def predict() -> int:
            with httpx.Client() as client:  # a new connection: either process may take it
                return client.post(url + "/predict", files={"file": ("x.jpg", jpeg())}).status_code

        statuses = []
        while not _listening(newcomer, port):
            assert time.time() < deadline, log.read_text()
            statuses.append(predict())
        statuses += [predict() for _ in range(8)]
        assert set(statuses) == {200}, statuses

        # SIGTERM to the supervisor alone (as Docker sends it to PID 1): all drain and exit 0.
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert not _children(process.pid)
    text = log.read_text()
    assert "Traceback" not in text
    assert "was killed by SIGKILL; starting another" in text
    assert "was killed by SIGKILL before it was ready; starting another in 1 s" in text
    # Where it serves, as one process says it; a process that never got ready is not named.
    ready = re.findall(rf"worker (\d) ready on http://127\.0\.0\.1:{port} \(Ctrl-C to stop\)", text)
    assert sorted(ready[:2]) == ["0", "1"] and len(ready) == 3, text  # both, then the newcomer


def _running(pid: int) -> bool:
    """Whether process `pid` runs: neither gone nor a zombie its new parent has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.slow
def test_workers_stop_when_their_supervisor_is_killed(artifact: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with _two_workers(artifact, port, log) as process:
        orphans = _workers(process.pid)
        process.kill()  # SIGKILL: the supervisor cannot stop them itself
        process.wait(10)
        deadline = time.time() + 30
        while running := [pid for pid in orphans if _running(pid)]:
            # They used to serve on, children of PID 1, until killed one by one.
            assert time.time() < deadline, f"{running} outlived the supervisor\n{log.read_text()}"
            time.sleep(0.2)
    workers.claim_port("127.0.0.1", port).close()  # nobody serves there any more
    assert "Traceback" not in log.read_text()


def test_a_worker_whose_supervisor_died_before_it_asked_stops_at_once() -> None:
    """A parent that died before the request to follow it leaves nothing to fire it: the worker
    sees its parent changed and sends itself the SIGTERM (0: no process's parent)."""
    code = (
        "import signal, sys; from app import workers; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(15)); "
        "workers.stop_with_parent(0); sys.exit(0)"
    )
    result = run_cli("-c", code, timeout=60)
    assert result.returncode == 15, result.stderr
    assert "the supervisor (pid 0) is gone; this worker stops" in result.stderr


def _listening_socket(port: int, *, reuseport: bool) -> socket.socket:
    """A socket listening on 127.0.0.1:`port`: another program's (SO_REUSEADDR, as uvicorn
    binds) or, with `reuseport`, a worker's of another instance of this service."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_the_port_of_another_instance_is_refused_while_it_serves_and_while_it_loads() -> None:
    port = free_port()
    # Its workers listen with SO_REUSEPORT, which the kernel would let this user's sockets join.
    with _listening_socket(port, reuseport=True), pytest.raises(OSError) as serving:
        workers.claim_port("127.0.0.1", port)
    assert serving.value.errno == errno.EADDRINUSE
    # Before its models are warm nothing listens: only its supervisor's hold is there.
    with workers.claim_port("127.0.0.1", port), pytest.raises(OSError) as loading:
        workers.claim_port("127.0.0.1", port)
    assert loading.value.errno == errno.EADDRINUSE


def test_the_workers_of_one_instance_share_its_port() -> None:
    port = free_port()
    with (
        workers.claim_port("127.0.0.1", port),
        workers.reuseport_sockets("127.0.0.1", port) as one,
        workers.reuseport_sockets("127.0.0.1", port) as two,
    ):
        for sock in one + two:
            sock.listen()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")


def _resolving(monkeypatch: pytest.MonkeyPatch, name: str, *ips: str) -> None:
    """Have `name` resolve to `ips` (as /etc/hosts would), whatever this machine's resolver says."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str | None, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host != name:
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
            if ":" in ip
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@needs_ipv6
def test_a_hostname_with_only_an_ipv6_address_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its family was guessed from a ':' in the host: IPv4, and the name did not resolve."""
    _resolving(monkeypatch, "v6only.test", "::1")
    port = free_port()
    workers.check_port_free("v6only.test", port)
    with (
        workers.claim_port("v6only.test", port),
        workers.reuseport_sockets("v6only.test", port) as worker,
    ):
        assert [s.getsockname()[:2] for s in worker] == [("::1", port)]


@needs_ipv6
def test_a_port_taken_at_any_address_of_the_host_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolving(monkeypatch, "both.test", "127.0.0.1", "::1")
    port = free_port()
    with socket.socket(socket.AF_INET6) as other:  # another program, on the IPv6 address only
        other.bind(("::1", port))
        other.listen()
        with pytest.raises(OSError) as taken:
            workers.check_port_free("both.test", port)
    assert taken.value.errno == errno.EADDRINUSE
    with workers.claim_port("both.test", port) as hold:
        assert sorted(s.family for s in hold) == [socket.AF_INET, socket.AF_INET6]


@needs_ipv6
def test_a_blank_host_binds_every_interface_of_both_families() -> None:
    """As one uvicorn process does; the IPv6 socket is IPv6 only, else it would hold the IPv4
    port too and the second bind would fail."""
    port = free_port()
    with workers.claim_port("", port) as hold:
        assert sorted(s.getsockname()[0] for s in hold) == ["0.0.0.0", "::"]
        with pytest.raises(OSError):
            workers.check_port_free("127.0.0.1", port)


def test_without_ipv6_the_ipv4_addresses_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without IPv6 (ipv6.disable=1) cannot make an IPv6 socket: a blank host, which
    always names '::' too, failed whole (one uvicorn process leaves such an address out)."""
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    port = free_port()
    workers.check_port_free("", port)
    with workers.claim_port("", port) as hold:
        assert [s.getsockname()[0] for s in hold] == ["0.0.0.0"]
    _resolving(monkeypatch, "v6only.test", "::1")
    with pytest.raises(OSError) as nothing_left:
        workers.check_port_free("v6only.test", port)
    assert nothing_left.value.errno == errno.EAFNOSUPPORT


def test_a_port_left_in_time_wait_by_a_one_process_server_can_be_claimed() -> None:
    with _listening_socket(0, reuseport=False) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            accepted.close()  # the server closes first: its side of the connection waits
    workers.claim_port("127.0.0.1", port).close()


@pytest.mark.slow
@pytest.mark.parametrize("count", ["1", "2"])
@pytest.mark.parametrize(
    "taken_by", ["another program", "another instance serving", "another instance loading"]
)
def test_a_port_in_use_is_a_one_line_error(artifact: Path, taken_by: str, count: str) -> None:
    """One process too: uvicorn found the port taken only after the model had loaded, and
    said so in its own log line, exit code 3."""
    port = free_port()
    if taken_by == "another instance loading":
        taken = workers.claim_port("127.0.0.1", port)
    else:
        taken = _listening_socket(port, reuseport=taken_by == "another instance serving")
    with taken:
        result = run_cli(
            "-m", "app", "--checkpoint", artifact, "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--workers", count, "--log-level", "warning", timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(another server there? choose --port)"
    )


def test_a_host_that_does_not_resolve_is_a_one_line_error(artifact: Path) -> None:
    result = run_cli(
        "-m", "app", "--checkpoint", artifact, "--host", "nosuch.invalid", "--port", "8000",
        "--device", "cpu", timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on nosuch.invalid:8000: ")
    assert lines[0].endswith(" (see --host)")


def test_restart_policy() -> None:
    """The policy of app/workers.py, exit by exit (the processes are not needed)."""
    at_startup = workers._Slot(0, process=None, ready=None)  # type: ignore[arg-type]
    assert workers._restart_delay(at_startup, 1, ready=False) is None  # it would fail again
    slot = workers._Slot(0, process=None, ready=None)  # type: ignore[arg-type]
    assert workers._restart_delay(slot, -9, ready=True) == 0  # killed while serving
    # Replacements killed while they load: pauses that double, then the service stops.
    delays = [workers._restart_delay(slot, -9, ready=False) for _ in range(5)]
    assert delays == [1, 2, 4, 8, None]
    # A replacement that got ready ends the failures in a row.
    slot = workers._Slot(0, process=None, ready=None)  # type: ignore[arg-type]
    delays = [workers._restart_delay(slot, -9, ready=r) for r in (True, False, True, False)]
    assert delays == [0, 1, 0, 1]


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (1, "worker 0 exited with code 1 before it was ready, at startup; stopping, as the next "
            "would fail the same way"),
        (-9, "worker 0 was killed by SIGKILL before it was ready, at startup; stopping, as the "
             "next would fail the same way (see the error above, or check free memory)"),
        (143, "worker 0 was stopped by SIGTERM (exit code 143) before it was ready, at startup; "
              "stopping"),
        (130, "worker 0 was stopped by SIGINT (exit code 130) before it was ready, at startup; "
              "stopping"),
    ],
)  # fmt: skip
def test_the_log_says_how_a_worker_ended(
    code: int, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker stopped by a signal sent to it alone was said to have failed in a way the
    next would repeat."""
    at_startup = workers._Slot(0, process=None, ready=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="app.workers"):
        assert workers._restart_delay(at_startup, code, ready=False) is None
    (message,) = caplog.messages
    assert message.startswith(said)
    assert message == said or code in (1, -9)
    caplog.clear()
    served = workers._Slot(0, process=None, ready=None, served=True)  # type: ignore[arg-type]
    workers._restart_delay(served, code, ready=True)
    assert caplog.messages == [f"{said.split(' before')[0]}; starting another"]


@pytest.mark.slow
def test_workers_that_fail_at_start_stop_the_server_instead_of_restarting_forever(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that exits before it is ready, at startup, is not replaced: the supervisor
    stops and reports failure (exit 1), rather than respawning a broken worker in a loop."""
    # The workers build their app from APP_* variables; an invalid one fails each at start.
    monkeypatch.setenv("APP_CHECKPOINT", str(artifact))
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "0")

    def restarting_forever(*_: object) -> None:
        raise TimeoutError("the supervisor kept restarting workers that fail at start")

    previous = signal.signal(signal.SIGALRM, restarting_forever)
    signal.alarm(60)  # fail, not hang, if they are restarted in a loop
    try:
        assert workers.run_workers(2, "127.0.0.1", free_port(), 5.0, log_level="critical") == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_stop_noted_before_the_supervisor_started_starts_no_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Ctrl-C after the model check, before the supervisor's handlers: it went unseen."""
    port = free_port()
    stops = [int(signal.SIGINT)]
    with caplog.at_level(logging.INFO, logger="app.workers"):
        code = workers.run_workers(2, "127.0.0.1", port, 1.0, stops=stops, log_level="critical")
    assert code == 130
    assert "started" not in caplog.text
    workers.claim_port("127.0.0.1", port).close()  # and the port is free again


# Loaded by every Python process of the test through PYTHONPATH; acts in the workers only: the
# moment a worker starts to import $WHEN, a Ctrl-C to the worker alone or, as at a terminal, to
# the whole process group ($TO).
CTRL_C_IN_A_WORKER = """
import os, signal, sys

class CtrlCWhenImported:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["WHEN"]:
            sys.meta_path.remove(self)
            if os.environ["TO"] == "group":
                os.killpg(0, signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)
        return None

if "--multiprocessing-fork" in sys.argv:
    sys.meta_path.insert(0, CtrlCWhenImported())
"""


def _serve_two_workers_with(
    artifact: Path, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_IN_A_WORKER)
    path = os.pathsep.join([str(tmp_path), str(ROOT)])
    args = [
        "-m", "app", "--checkpoint", artifact, "--port", free_port(), "--device", "cpu",
        "--workers", "2", "--threads", "1", "--graceful-shutdown-s", "1",
    ]  # fmt: skip
    return run_cli(*args, env=cli_env(PYTHONPATH=path, **env), timeout=100)


@pytest.mark.slow
def test_ctrl_c_in_a_worker_during_its_start_up_is_no_traceback(
    artifact: Path, tmp_path: Path
) -> None:
    """In multiprocessing's start-up code (here: unpickling the worker's function) a Ctrl-C
    raised KeyboardInterrupt, and each worker printed a traceback."""
    result = _serve_two_workers_with(artifact, tmp_path, WHEN="uvicorn", TO="worker")
    assert "Traceback" not in result.stderr
    # A worker that does not start stops the service (the restart policy), saying why.
    assert result.returncode == 1, result.stderr
    assert "was stopped by SIGINT (exit code 130) before it was ready" in result.stderr
    assert "would fail the same way" not in result.stderr  # said once for any exit at startup


@pytest.mark.slow
def test_ctrl_c_while_uvicorn_starts_in_the_workers_stops_them(
    artifact: Path, tmp_path: Path
) -> None:
    """After a worker set its own handlers and before uvicorn set its, the worker swallowed the
    Ctrl-C and then the supervisor's SIGTERM: it loaded its model and served, and the
    supervisor killed it once the drain time was over."""
    result = _serve_two_workers_with(artifact, tmp_path, WHEN="uvicorn.loops.auto", TO="group")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "did not stop in time" not in result.stderr
    assert "Application startup complete" not in result.stderr  # no model was loaded
