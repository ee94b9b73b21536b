"""The service under its settings: shared batches, a full queue, deadlines, the API key,
readiness (loading, failed), both checkpoint formats, and precision choice."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import app.state
from app.main import create_app
from app.predictor import Predictor
from app.settings import Settings
from tests.app import images
from tests.app.conftest import BASE_SETTINGS, ServedModel, ServeFactory, wait_ready
from tests.app.support import (
    API_KEY,
    TEST_ACCURACY,
    Reference,
    assert_error,
    assert_no_internals,
    batch_sizes_over_one,
    parse_metrics,
    sample,
    served_probs,
)
from training.artifact import load_for_inference, sha256_file
from training.data import Split
from training.engine import evaluate_model
from training.preprocess import reduce_image

TOLERANCE = 1e-5


def concurrently(n: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """`call(0..n-1)` from n threads released together; the responses in index order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> httpx.Response:
        barrier.wait()
        return call(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def post_image(client: TestClient, data: bytes, **kwargs: Any) -> httpx.Response:
    return client.post("/predict", files=images.upload(data), **kwargs)


# ---- dynamic batching -------------------------------------------------------------------------


def test_concurrent_requests_share_forward_passes(
    serve: ServeFactory, reference: Reference
) -> None:
    client = serve(max_batch_size=8, max_batch_delay_ms=200)
    uploads = [images.png(100 + i, (40, 36)) for i in range(8)]
    responses = concurrently(8, lambda i: post_image(client, uploads[i], params={"top_k": 10}))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    direct = reference.probs(*uploads).double()
    for response, expected in zip(responses, direct, strict=True):
        served = served_probs(response.json())
        assert torch.allclose(served, expected, atol=TOLERANCE, rtol=0)
    metrics = parse_metrics(client.get("/metrics").text)
    assert sample(metrics, "inference_batch_size_sum") == 8
    assert batch_sizes_over_one(metrics) >= 1, "no forward pass held two requests' images"
    assert sample(metrics, "inference_batch_size_count") < 8


# ---- overload and deadlines -------------------------------------------------------------------


def test_full_queue_answers_503_busy_with_retry_after(serve: ServeFactory) -> None:
    client = serve(max_queue=1, max_batch_size=1)
    batcher = client.app.state.serving.batcher  # type: ignore[attr-defined]
    # Hold the model: the first image is taken into a forward pass that waits on the gate, a
    # second waits in the queue (max_queue=1), and every further one must be refused.
    gate, entered = threading.Event(), threading.Event()
    forward = batcher._predict

    def held(batch: torch.Tensor) -> torch.Tensor:
        entered.set()
        assert gate.wait(30)
        return forward(batch)

    batcher._predict = held
    n = 8
    with ThreadPoolExecutor(n) as pool:
        first = pool.submit(post_image, client, images.png(1))
        assert entered.wait(30)
        rest = [pool.submit(post_image, client, images.png(2 + i)) for i in range(n - 1)]
        # Exactly one more fits in the queue; the others are answered at once, while held.
        assert wait_for(lambda: sum(f.done() for f in rest) >= n - 2)
        gate.set()
        responses = [first.result(), *(f.result() for f in rest)]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 2 + [503] * (n - 2), [r.text for r in responses]
    for response in responses:
        if response.status_code == 503:
            assert_error(response, 503, "busy")
            assert int(response.headers["Retry-After"]) >= 1
    assert client.get("/health").status_code == 200
    # A batch larger than the whole queue could never get in: not 'busy, retry' but a 413.
    too_big = client.post("/predict/batch", files=images.uploads(images.png(1), images.png(2)))
    assert "APP_MAX_QUEUE" in assert_error(too_big, 413, "too_many_files")["detail"]
    assert post_image(client, images.png(20)).status_code == 200
    assert queue_depth(client) == 0


def _post_and_hang_up(client: TestClient, path: str, files: Any, leave_when: Callable[[], bool]):
    """POST `files` to the app straight over ASGI, as a client that sends its request, then
    disconnects once `leave_when()` holds; the statuses the app sent (to nobody)."""
    request = httpx.Request("POST", "http://testserver" + path, files=files)
    body = request.read()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
    }  # fmt: skip
    sent_body, statuses = False, []

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not leave_when():
            await anyio.sleep(0.005)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    return statuses


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_images_of_a_client_that_left_are_not_run(serve: ServeFactory, path: str) -> None:
    client = serve(max_batch_size=1)
    batcher = client.app.state.serving.batcher  # type: ignore[attr-defined]
    gate, entered, forwards = threading.Event(), threading.Event(), []
    forward = batcher._predict

    def held(batch: torch.Tensor) -> torch.Tensor:
        forwards.append(len(batch))
        entered.set()
        assert gate.wait(30)
        return forward(batch)

    batcher._predict = held
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_image, client, images.png(1))  # holds the model
        assert entered.wait(30)
        field = "file" if path == "/predict" else "files"
        files = [
            (field, (f"{i}.png", images.png(10 + i), "image/png"))
            for i in range(2 if field == "files" else 1)
        ]
        # The client leaves while its images wait in the queue behind the held forward pass.
        statuses = _post_and_hang_up(client, path, files, lambda: batcher._waiting >= len(files))
        gate.set()
        assert first.result().status_code == 200
    assert statuses == [499]
    assert wait_for(lambda: queue_depth(client) == 0)
    assert post_image(client, images.png(2)).status_code == 200
    assert forwards == [1, 1]  # the held request and the one after: the leaver's never ran
    metrics = parse_metrics(client.get("/metrics").text)
    assert sample(metrics, "http_requests_total", endpoint=path, method="POST", status="499")


def test_deadline_answers_504_and_the_server_stays_healthy(serve: ServeFactory) -> None:
    client = serve(request_timeout_s=0.001, max_batch_delay_ms=1000)
    body = assert_error(post_image(client, images.png(3)), 504, "timeout")
    assert "0.001" in body["detail"]
    response = client.post("/predict/batch", files=images.uploads(images.png(4), images.png(5)))
    assert_error(response, 504, "timeout")
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/model").status_code == 200
    metrics = parse_metrics(client.get("/metrics").text)
    assert sample(metrics, "http_requests_total", endpoint="/predict", method="POST", status="504")
    # Expired images still queued (behind a forward pass) are dropped, not left waiting.
    assert wait_for(lambda: queue_depth(client) == 0)


def test_the_deadline_covers_decoding(serve: ServeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """APP_REQUEST_TIMEOUT_S bounds the whole request: an upload whose decoding outlasts it
    is answered 504 at the deadline, not when (or if) the decoding ends."""
    import app.routes

    release, finished = threading.Event(), threading.Event()
    real = app.routes.decode_upload

    def slow_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        release.wait(30)  # a huge image, or one queued behind others
        finished.set()
        return real(*args, **kwargs)

    client = serve(request_timeout_s=0.3)
    monkeypatch.setattr(app.routes, "decode_upload", slow_decode)
    for response in (
        post_image(client, images.png(3)),
        client.post("/predict/batch", files=images.uploads(images.png(4))),
    ):
        assert not finished.is_set()  # answered while the decoding still ran
        assert "0.3 s" in assert_error(response, 504, "timeout")["detail"]
    release.set()
    monkeypatch.undo()
    assert post_image(client, images.png(5)).status_code == 200
    assert client.get("/health").json()["status"] == "ok"


def queue_depth(client: TestClient) -> float:
    return sample(parse_metrics(client.get("/metrics").text), "inference_queue_depth")


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> bool:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return True
        done.wait(0.05)
    return condition()


# ---- API key ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_api_key_is_required_when_set(serve: ServeFactory, path: str) -> None:
    client = serve(api_key=API_KEY)
    field = "file" if path == "/predict" else "files"
    files = images.upload(images.png(6), field=field)
    assert_error(client.post(path, files=files), 401, "unauthorized")
    wrong = {"X-API-Key": API_KEY + "x"}
    assert_error(client.post(path, files=files, headers=wrong), 401, "unauthorized")
    assert_error(client.post(path, files=files, headers={"X-API-Key": ""}), 401, "unauthorized")
    right = client.post(path, files=files, headers={"X-API-Key": API_KEY})
    assert right.status_code == 200, right.text
    padded = client.post(path, files=files, headers={"X-API-Key": f" {API_KEY}\t"})
    assert padded.status_code == 200, padded.text  # whitespace around is no part of the key
    for open_path in ("/health", "/model", "/metrics", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path


def test_no_api_key_needed_when_none_is_set(serve: ServeFactory) -> None:
    client = serve(api_key="")  # an empty key means none
    assert post_image(client, images.png(7)).status_code == 200
    batch = client.post("/predict/batch", files=images.uploads(images.png(8)))
    assert batch.status_code == 200


def test_a_request_cancelled_at_the_shutdown_timeout_is_a_503_without_a_traceback(
    serve: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn cancels the requests still running when APP_GRACEFUL_SHUTDOWN_S is up; the
    CancelledError reached it, which logged a traceback and answered 500. Here: an upload
    that never completes, its task cancelled as uvicorn does it, through the whole app."""
    client = serve(graceful_shutdown_s=1.5, read_timeout_s=60.0)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
        "headers": [(b"content-type", b"multipart/form-data; boundary=xyz")],
    }  # fmt: skip
    first = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"

    async def scenario() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        bodies = [{"type": "http.request", "body": first, "more_body": True}]

        async def receive() -> dict[str, Any]:
            if bodies:
                return bodies.pop()
            await asyncio.Event().wait()  # the rest never comes
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        task = asyncio.create_task(client.app(scope, receive, send))
        await asyncio.sleep(0.2)
        task.cancel("Task cancelled, timeout graceful shutdown exceeded")
        await task  # answered, not raised
        return sent

    with caplog.at_level(logging.WARNING, logger="app"):
        sent = asyncio.run(scenario())
    start, body = sent[0], json.loads(sent[1]["body"])
    assert start["status"] == 503 and (b"connection", b"close") in start["headers"]
    assert body["error"] == "shutting_down" and "send it again" in body["detail"]
    assert "POST /predict cancelled: the server stopped before it finished" in caplog.text
    assert "(APP_GRACEFUL_SHUTDOWN_S: 2 s)" in caplog.text  # as uvicorn was given it: ceil


@pytest.mark.parametrize(
    ("key", "said"),
    [(API_KEY, "predictions need X-API-Key"), (" ", "no API key (APP_API_KEY) needed")],
)
def test_the_startup_log_says_whether_a_key_is_needed(
    serve: ServeFactory, caplog: pytest.LogCaptureFixture, key: str, said: str
) -> None:
    """A key meant but blank (an empty APP_API_KEY is 'none') is seen in the log."""
    with caplog.at_level(logging.INFO, logger="app"):
        serve(api_key=key)
    [line] = [m for m in caplog.messages if m.startswith("serving ")]
    assert line.endswith(said), line


# ---- readiness --------------------------------------------------------------------------------


@pytest.fixture
def held_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Model loading waits until the yielded event is set."""
    release = threading.Event()
    real = app.state.load_predictor

    def slow(*args: Any) -> Any:
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(app.state, "load_predictor", slow)
    yield release
    release.set()


def test_not_ready_until_the_model_is_loaded(
    serve: ServeFactory, held_loading: threading.Event
) -> None:
    client = serve(load=True, wait=False)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "loading"
    for response in (
        post_image(client, images.png(9)),
        client.post("/predict/batch", files=images.uploads(images.png(9))),
        client.get("/model"),
    ):
        assert_error(response, 503, "not_ready")
        assert response.headers["Retry-After"]
    assert client.get("/metrics").status_code == 200
    held_loading.set()
    wait_ready(client)
    assert client.get("/health").status_code == 200
    assert post_image(client, images.png(9)).status_code == 200


def write_corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 100)
    return path


@pytest.mark.parametrize(
    "make_checkpoint",
    [
        pytest.param(lambda tmp: tmp / "no-such-weights", id="missing"),
        pytest.param(write_corrupt, id="corrupt-file"),
        pytest.param(lambda tmp: tmp, id="folder-without-model-json"),
    ],
)
def test_a_model_that_fails_to_load_is_reported_without_internals(
    serve: ServeFactory, tmp_path: Path, make_checkpoint: Callable[[Path], Path]
) -> None:
    client = serve(checkpoint=make_checkpoint(tmp_path), wait=False)
    wait_ready(client, status="failed")
    health = client.get("/health")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "failed"
    assert body["detail"]
    assert_no_internals(health.text)
    assert str(tmp_path) not in health.text
    for response in (
        post_image(client, images.png(10)),
        client.post("/predict/batch", files=images.uploads(images.png(10))),
        client.get("/model"),
    ):
        assert_error(response, 503, "not_ready")
        assert str(tmp_path) not in response.text
    assert client.get("/metrics").status_code == 200


def test_a_warm_up_failure_is_reported_by_type_only(
    serve: ServeFactory, shared_predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA error at /srv/models/secret/weights (device 0)")

    monkeypatch.setattr(shared_predictor, "warm_up", fail)
    client = serve(wait=False)
    wait_ready(client, status="failed")
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["detail"] == (
        "model failed to load: RuntimeError; the server log has the details"
    )
    assert "secret" not in health.text
    assert_error(post_image(client, images.png(10)), 503, "not_ready")


def test_a_failed_forward_pass_is_a_500_without_internals_and_the_next_one_works(
    artifact: Path, shared_predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shared_predictor.predict
    failures: list[int] = []  # armed once the app has warmed up (warm-up runs predict too)

    def fail_once(images: torch.Tensor) -> torch.Tensor:
        if failures == [0]:
            failures[0] = len(images)
            raise RuntimeError("out of memory at /srv/models/secret/weights")
        return real(images)

    monkeypatch.setattr(shared_predictor, "predict", fail_once)
    settings = Settings(**{**BASE_SETTINGS, "checkpoint": artifact})
    # As uvicorn does: the error handler answers, the exception goes to the log, not the client.
    with TestClient(
        create_app(settings, shared_predictor), raise_server_exceptions=False
    ) as client:
        wait_ready(client)
        failures.append(0)
        failed = post_image(client, images.png(10))
        assert_error(failed, 500, "internal_error")
        assert "secret" not in failed.text and "memory" not in failed.text
        assert failures == [1]  # the one request's batch failed
        assert post_image(client, images.png(10)).status_code == 200
        assert client.get("/health").status_code == 200


# ---- checkpoint formats and precision ---------------------------------------------------------


def test_serves_a_training_checkpoint_file(serve: ServeFactory, served_model: ServedModel) -> None:
    client = serve(checkpoint=served_model.checkpoint)
    info = client.get("/model").json()
    assert info["checkpoint_format"] == "training-checkpoint"
    assert info["checkpoint"] == "last.pt"
    assert info["sha256"] == sha256_file(served_model.checkpoint)
    assert info["accuracy"]["test"] == TEST_ACCURACY
    assert info["quantization"] is None
    assert client.get("/health").json()["model"]["sha256"] == info["sha256"]
    # Full-precision weights, straight from the checkpoint.
    uploads = [images.png(11, (45, 30)), images.jpeg(12)]
    direct = Reference(served_model.checkpoint).probs(*uploads).double()
    for data, expected in zip(uploads, direct, strict=True):
        response = post_image(client, data, params={"top_k": 10})
        served = served_probs(response.json())
        assert torch.allclose(served, expected, atol=TOLERANCE, rtol=0)


def test_auto_precision_on_cpu_times_both_and_keeps_the_faster(serve: ServeFactory) -> None:
    client = serve(precision="auto", max_batch_size=2)
    info = client.get("/model").json()
    timings = info["warmup"]["seconds_per_batch"]
    assert set(timings) == {"fp32", "bf16"}
    assert info["warmup"]["chosen"] == min(timings, key=timings.__getitem__)
    assert info["precision"] == info["warmup"]["chosen"]
    assert client.get("/health").json()["precision"] == info["precision"]
    response = post_image(client, images.png(13), params={"top_k": 10})
    assert response.status_code == 200
    total = sum(e["probability"] for e in response.json()["top_k"])
    assert total == pytest.approx(1.0, abs=1e-3)


def test_served_bf16_answers_are_the_offline_bf16_evaluation(
    serve: ServeFactory, artifact: Path
) -> None:
    """README's "served equals trained" compares the server, in the bf16 it chose, with
    `training.evaluate --precision bf16`: image for image, the same label."""
    client = serve(precision="bf16")
    assert client.get("/health").json()["precision"] == "bf16"
    uploads = [images.jpeg(seed) for seed in range(12)]
    loaded = load_for_inference(artifact)
    size = loaded.preprocessing.source_size
    split = Split(
        torch.stack([reduce_image(Image.open(io.BytesIO(u)), size) for u in uploads]),
        torch.zeros(len(uploads), dtype=torch.long),
    )
    _, offline = evaluate_model(
        loaded, split, loaded.classes, device=torch.device("cpu"), precision="bf16"
    )
    assert len(set(offline.tolist())) >= 3  # not one class for everything
    served = [post_image(client, data).json()["class_id"] for data in uploads]
    assert served == offline.tolist()


def test_create_app_reads_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, artifact: Path
) -> None:
    for name, value in BASE_SETTINGS.items():
        monkeypatch.setenv(f"APP_{name.upper()}", str(value))
    monkeypatch.setenv("APP_CHECKPOINT", str(artifact))
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("APP_API_KEY", API_KEY)
    application = create_app()
    settings: Settings = application.state.serving.settings
    assert settings.max_batch_size == 3
    assert settings.checkpoint == artifact
    assert settings.api_key is not None and settings.api_key.get_secret_value() == API_KEY
