"""The real thing: `python -m app` in a subprocess, spoken to over TCP.

One server for the module (startup costs seconds): HTTP answers, a streamed upload over the
limit, clients that vanish mid-request, and last, SIGTERM while requests are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.app import images
from tests.app.support import (
    CLASSES,
    MAX_BATCH,
    MAX_UPLOAD,
    READ_TIMEOUT_S,
    Reference,
    Server,
    assert_error,
    parse_metrics,
    sample,
    served_probs,
    start_server,
)

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5


# ---- raw HTTP/1.1, for what httpx will not do (half requests, vanishing clients) --------------


def raw_request(url: str, method: str = "POST", **kwargs: Any) -> bytes:
    """The bytes of an HTTP/1.1 request (Connection: close), built by httpx."""
    request = httpx.Request(method, url, **kwargs)
    body = request.read()
    target = request.url.raw_path.decode()
    head = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in request.headers.items())]
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class RawResponse:
    status: int
    body: bytes


def read_response(sock: socket.socket) -> RawResponse:
    sock.settimeout(60)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return RawResponse(status, body)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=60)


def predict_batch_request(server: Server, seeds: list[int]) -> bytes:
    files = images.uploads(*(images.png(seed) for seed in seeds))
    return raw_request(server.url + "/predict/batch", files=files, params={"top_k": 10})


# ---- the tests, in order ----------------------------------------------------------------------


def test_serves_predictions_over_http(server: Server, reference: Reference) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    data = images.png(1, (50, 40), mode="RGBA")
    response = httpx.post(
        server.url + "/predict", files=images.upload(data), params={"top_k": 10}, timeout=60
    )
    assert response.status_code == 200, response.text
    served = served_probs(response.json())
    assert torch.allclose(served, reference.probs(data)[0].double(), atol=TOLERANCE, rtol=0)
    info = httpx.get(server.url + "/model").json()
    assert info["classes"] == CLASSES
    assert info["checkpoint_format"] == "artifact"
    assert info["batching"]["max_batch_size"] == MAX_BATCH
    assert httpx.get(server.url + "/docs").status_code == 200
    metrics = parse_metrics(httpx.get(server.url + "/metrics").text)
    assert sample(metrics, "http_requests_total", endpoint="/predict", method="POST", status="200")


def test_a_streamed_upload_over_the_limit_is_refused(server: Server) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the limit: 413."""
    head = (
        "POST /predict HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nConnection: close\r\n\r\n"
    )
    part = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
    chunk = b"\0" * 16_384
    with connect(server) as sock:
        sock.sendall(head.encode() + b"%x\r\n%s\r\n" % (len(part), part))
        sent = 0
        while sent < 4 * MAX_UPLOAD:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if select.select([sock], [], [], 0.05)[0]:
                break  # the server has answered: stop sending
        response = read_response(sock)
    assert response.status == 413, response
    assert sent < 4 * MAX_UPLOAD  # refused while the body was still coming
    assert_error(httpx.Response(413, content=response.body, headers=JSON), 413, "too_large")


JSON = {"content-type": "application/json"}


def test_an_upload_over_the_limit_is_answered_to_a_client_still_sending(server: Server) -> None:
    """Refused from its Content-Length while the client still sends the body: the client gets
    the 413 (the rest is read and dropped), not a reset connection, and the same connection
    then serves the next request. With 'Connection: close' the server closed with the body
    unread; the kernel reset the connection, and httpx (as the CLI client uses it) raised
    ReadError instead of showing the 413."""

    async def over_then_under() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            over = images.upload(b"\0" * (40 * MAX_UPLOAD))  # 8 MB: still sending when refused
            return [
                await client.post("/predict", files=over),
                await client.post("/predict", files=images.upload(images.png())),
            ]

    too_large, fine = asyncio.run(over_then_under())
    assert_error(too_large, 413, "too_large")
    assert fine.status_code == 200, fine.text


def test_vanishing_clients_do_not_break_their_batch_mates(
    server: Server, reference: Reference
) -> None:
    uploads = [images.png(200 + i) for i in range(6)]
    expected = reference.probs(*uploads).double()
    half = predict_batch_request(server, [1, 2, 3])
    full = predict_batch_request(server, [4, 5])
    barrier = threading.Barrier(len(uploads) + 2, timeout=60)

    def good(i: int) -> httpx.Response:
        barrier.wait()
        files, params = images.upload(uploads[i]), {"top_k": 10}
        return httpx.post(server.url + "/predict", files=files, params=params, timeout=60)

    def sends_half_and_leaves() -> None:
        with connect(server) as sock:
            barrier.wait()
            sock.sendall(half[: len(half) // 2])

    def sends_all_and_leaves() -> None:
        with connect(server) as sock:
            barrier.wait()
            sock.sendall(full)  # and closes before reading the answer

    with ThreadPoolExecutor(len(uploads) + 2) as pool:
        rude = [pool.submit(sends_half_and_leaves), pool.submit(sends_all_and_leaves)]
        answers = list(pool.map(good, range(len(uploads))))
        for future in rude:
            future.result()
    for response, probs in zip(answers, expected, strict=True):
        assert response.status_code == 200, response.text
        assert torch.allclose(served_probs(response.json()), probs, atol=TOLERANCE, rtol=0)
    assert httpx.get(server.url + "/health").status_code == 200
    again = httpx.post(server.url + "/predict", files=images.upload(uploads[0]), timeout=60)
    assert again.status_code == 200
    assert "Traceback" not in server.output()


def _answer_within(sock: socket.socket, seconds: float) -> RawResponse | None:
    """What the server sends before it closes the connection (None: it closed silently)."""
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(65536):  # socket.timeout here: the server never answered
        data += chunk
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return RawResponse(int(head.split(b" ", 2)[1]), body)


def _assert_json_error(response: RawResponse | None, status: int, code: str) -> None:
    assert response is not None and response.status == status, response
    assert_error(httpx.Response(status, content=response.body, headers=JSON), status, code)


def test_clients_that_stall_are_answered_and_disconnected(server: Server) -> None:
    """uvicorn alone waited for them forever (slowloris): a socket, a buffer and, at shutdown,
    the graceful-drain time each."""
    request = raw_request(server.url + "/predict", files=images.upload(images.png(7)))
    head_end = request.index(b"\r\n\r\n") + 4
    wait = READ_TIMEOUT_S + 5
    with connect(server) as silent, connect(server) as slow_head, connect(server) as stalled:
        slow_head.sendall(request[: head_end // 2])
        stalled.sendall(request[: head_end + 100])  # the headers and a little of the body
        assert _answer_within(silent, wait) is None  # a connection that never spoke: closed
        _assert_json_error(_answer_within(slow_head, wait), 408, "request_timeout")
        _assert_json_error(_answer_within(stalled, wait), 408, "request_timeout")
    with connect(server) as endless:
        endless.sendall(b"GET /health HTTP/1.1\r\nX-Padding: ")
        for _ in range(40):  # 40 x 4 KiB of one header value, never finished
            try:
                endless.sendall(b"a" * 4096)
            except OSError:  # refused and closed while sending: read the answer
                break
        _assert_json_error(_answer_within(endless, wait), 431, "headers_too_large")
    with connect(server) as one_read:  # a head over the limit in a single read
        one_read.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        _assert_json_error(_answer_within(one_read, wait), 431, "headers_too_large")
    with connect(server) as kept_alive:  # a request answered, then a next one that stalls
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        kept_alive.settimeout(wait)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += kept_alive.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += kept_alive.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and len(body) == length
        kept_alive.sendall(b"\r\n")  # bytes the parser skips: no request begins
        _assert_json_error(_answer_within(kept_alive, wait), 408, "request_timeout")
    with connect(server) as garbled:  # uvicorn's own refusal, in the service's JSON
        garbled.sendall(b"GARBAGE\r\n\r\n")
        _assert_json_error(_answer_within(garbled, wait), 400, "bad_request")
    # Patient clients are not affected: a keep-alive connection, two requests.
    with httpx.Client(base_url=server.url) as client:
        for _ in range(2):
            assert client.get("/health").status_code == 200


def test_sigterm_answers_requests_in_flight_then_exits_0(server: Server) -> None:
    seeds = [list(range(300 + 16 * i, 316 + 16 * i)) for i in range(5)]  # 5 x 16 images
    total = sum(len(s) for s in seeds)
    requests = [predict_batch_request(server, s) for s in seeds]
    sigterm_sent = threading.Event()
    before = parse_metrics(httpx.get(server.url + "/metrics").text)

    def images_accepted() -> float:
        """Images queued or already in a forward pass since `before`: each request that got
        this far is in flight in the server, past parsing and decoding."""
        now = parse_metrics(httpx.get(server.url + "/metrics").text)
        done = sample(now, "inference_batch_size_sum") - sample(before, "inference_batch_size_sum")
        return done + sample(now, "inference_queue_depth")

    def send(request: bytes) -> tuple[RawResponse, bool]:
        with connect(server) as sock:
            sock.sendall(request)
            response = read_response(sock)
        return response, sigterm_sent.is_set()

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(send, r) for r in requests]
        pause = threading.Event()
        for _ in range(600):
            if images_accepted() >= total:
                break
            pause.wait(0.05)
        assert images_accepted() >= total, "the requests did not all reach the batcher"
        server.process.send_signal(signal.SIGTERM)
        sigterm_sent.set()
        results = [f.result() for f in futures]
    assert server.process.wait(timeout=90) == 0, server.output()
    for (response, _), request_seeds in zip(results, seeds, strict=True):
        assert response.status == 200, response
        assert response.body.count(b'"prediction":{') == len(request_seeds)
    assert any(after for _, after in results), "every answer came before SIGTERM: nothing drained"
    assert "Traceback" not in server.output()


def test_a_second_ctrl_c_under_load_exits_without_aborting(artifact: Path, tmp_path: Path) -> None:
    """The second Ctrl-C makes uvicorn skip the app's shutdown. Python then exited while the
    inference thread was inside a forward pass: 'terminate called without an active
    exception' (SIGABRT), after asyncio's 'exception was never retrieved' errors."""
    server = start_server(artifact, tmp_path / "server.log")
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/predict/batch", files=images.uploads(*[images.png(1)] * 16))

    try:
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):
                pool.submit(load)
            pause = threading.Event()
            pause.wait(3)  # the queue fills, the model is busy
            server.process.send_signal(signal.SIGINT)
            pause.wait(0.3)
            server.process.send_signal(signal.SIGINT)
            code = server.process.wait(timeout=90)
            stop.set()
    finally:
        stop.set()
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
    output = server.output()
    assert code == 0, output[-3000:]
    assert "terminate called" not in output and "never retrieved" not in output, output[-3000:]


@pytest.mark.parametrize("guarded", [True, False], ids=["GuardedFromEnv", "uvicorn's own"])
def test_plain_uvicorn_takes_the_guarded_protocol_by_class_path(
    artifact: Path, tmp_path: Path, guarded: bool
) -> None:
    """`uvicorn --factory app.main:app_from_env --http app.protocol:GuardedFromEnv`, as README
    says: the read timeout is APP_READ_TIMEOUT_S's. Without `--http`, a stalled head is never
    answered (the case that shows the class is what makes the difference)."""
    args = ["--factory", "app.main:app_from_env"]
    if guarded:
        args += ["--http", "app.protocol:GuardedFromEnv"]
    server = start_server(artifact, tmp_path / "server.log", uvicorn_args=args)
    try:
        with connect(server) as slow_head:
            slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            if guarded:
                _assert_json_error(
                    _answer_within(slow_head, READ_TIMEOUT_S + 5), 408, "request_timeout"
                )
            else:
                with pytest.raises(TimeoutError):
                    _answer_within(slow_head, READ_TIMEOUT_S + 2)
    finally:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
