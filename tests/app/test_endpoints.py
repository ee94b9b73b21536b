"""Every endpoint of one app serving the exported artifact, and every way an upload can be bad.

One app for the module (it loads the artifact from disk, as the service does); the tests only
read from it, and the metrics test counts what it does itself.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.app import images
from tests.app.conftest import wait_ready
from tests.app.support import (
    CLASSES,
    TEST_ACCURACY,
    Reference,
    assert_error,
    parse_metrics,
    sample,
    served_probs,
)
from training.artifact import sha256_file
from training.model import ARCHITECTURE
from training.preprocess import Preprocessing

MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000
MAX_FILES = 4
TOLERANCE = 1e-5  # served vs direct fp32 probabilities (the API rounds to 6 decimals)


@pytest.fixture(scope="module")
def client(artifact: Path) -> Iterator[TestClient]:
    settings = Settings(
        checkpoint=artifact,
        device="cpu",
        precision="fp32",
        max_batch_size=4,
        max_batch_files=MAX_FILES,
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def predict(client: TestClient, data: bytes, top_k: int | None = 10, **kwargs: Any) -> Any:
    params = {} if top_k is None else {"top_k": top_k}
    response = client.post("/predict", files=images.upload(data), params=params, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def assert_healthy(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


# ---- /health, /model, /docs --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/model", "/metrics", "/"])
def test_get_endpoints_answer_head_probes(client: TestClient, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-type"] == client.get(path).headers["content-type"]


def test_health_names_the_served_model(client: TestClient, artifact: Path) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["device"] == "cpu"
    assert body["precision"] == "fp32"
    assert body["model"] == {
        "architecture": ARCHITECTURE,
        "sha256": sha256_file(artifact / "model.json"),
        "recipe": "seed",
        "test_accuracy": TEST_ACCURACY,
    }


def test_model_describes_what_is_served(client: TestClient, artifact: Path) -> None:
    response = client.get("/model")
    assert response.status_code == 200
    info = response.json()
    assert info["architecture"] == ARCHITECTURE
    assert info["model_args"]["num_classes"] == 10
    assert info["classes"] == CLASSES
    assert info["input_size"] == 227
    assert info["source_size"] == 32
    assert info["preprocessing"] == Preprocessing().to_dict()
    assert info["accuracy"]["test"] == TEST_ACCURACY
    assert info["accuracy"]["test_per_class"] == {name: float(i) for i, name in enumerate(CLASSES)}
    assert info["accuracy"]["validation"] == 13.0
    assert info["accuracy"]["best_validation"] == {"epoch": 3, "val_acc": 13.0}
    assert info["accuracy"]["checkpoint_test"] == TEST_ACCURACY
    assert info["recipe"] == "seed"
    assert info["epochs"] == 3
    assert info["checkpoint"] == artifact.name  # a name, not the server's path
    assert info["checkpoint_format"] == "artifact"
    assert info["sha256"] == sha256_file(artifact / "model.json")
    assert info["quantization"].startswith("int8")
    assert info["device"] == "cpu"
    assert info["precision"] == "fp32"
    assert info["warmup"]["chosen"] == "fp32"
    assert info["batching"]["max_batch_size"] == 4


def test_docs_and_openapi_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/predict", "/predict/batch", "/health", "/model", "/metrics"):
        assert path in paths


def test_the_page_and_the_docs_do_not_call_every_model_a_cifar_10_one(client: TestClient) -> None:
    """A model trained on one's own image folders is served too: the page's title and lede and
    /docs' summary said "AlexNet trained on CIFAR-10" whatever was served."""
    page = client.get("/").text
    assert "trained on CIFAR-10" not in page and "CIFAR-10 classifier" not in page
    assert "image classifier" in page
    summary = client.get("/openapi.json").json()["info"]["summary"]
    assert "trained on CIFAR-10" not in summary and "image classifier" in summary


# ---- /predict ---------------------------------------------------------------------------------


def test_predict_answers_label_confidence_and_top5_by_default(client: TestClient) -> None:
    body = predict(client, images.png(1), top_k=None)
    assert set(body) == {"label", "class_id", "confidence", "top_k"}
    top = body["top_k"]
    assert len(top) == 5
    assert all(set(entry) == {"label", "class_id", "probability"} for entry in top)
    assert [e["label"] for e in top] == [CLASSES[e["class_id"]] for e in top]
    assert (body["label"], body["class_id"], body["confidence"]) == (
        top[0]["label"],
        top[0]["class_id"],
        top[0]["probability"],
    )
    probabilities = [e["probability"] for e in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_sets_how_many_classes_come_back(client: TestClient, k: int) -> None:
    top = predict(client, images.png(2), top_k=k)["top_k"]
    assert len(top) == k
    assert len({e["class_id"] for e in top}) == k
    probabilities = [e["probability"] for e in top]
    assert probabilities == sorted(probabilities, reverse=True)
    if k == 10:
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def rgba_png() -> bytes:
    array = np.dstack([images.noise(3, (50, 40)), np.linspace(0, 255, 50 * 40).reshape(40, 50)])
    return images.encode(Image.fromarray(array.astype(np.uint8), mode="RGBA"), "PNG")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(rgba_png, id="png-50x40-rgba"),
        pytest.param(lambda: images.png(4), id="png-32x32"),
        pytest.param(lambda: images.jpeg(5, (97, 61)), id="jpeg-97x61"),
        pytest.param(lambda: images.png(6, (8, 300)), id="png-8x300"),
    ],
)
def test_prediction_equals_the_training_code_on_the_same_image(
    client: TestClient, reference: Reference, make: Any
) -> None:
    data = make()
    served = served_probs(predict(client, data, top_k=10))
    direct = reference.probs(data)[0].double()
    assert torch.allclose(served, direct, atol=TOLERANCE, rtol=0), (served, direct)
    assert int(served.argmax()) == int(direct.argmax())


def test_different_images_get_different_answers(client: TestClient) -> None:
    """Guards the comparisons above: the fixture model's outputs depend on the image."""
    a = served_probs(predict(client, images.png(7)))
    b = served_probs(predict(client, images.png(8)))
    assert (a - b).abs().max() > 0.01


# ---- /predict/batch ---------------------------------------------------------------------------


def test_batch_answers_in_upload_order_with_errors_in_their_slots(
    client: TestClient, reference: Reference
) -> None:
    good = [images.png(10), images.jpeg(11, (45, 45)), images.png(12, (20, 70))]
    files = images.uploads(good[0], b"not an image at all", good[1], good[2])
    response = client.post("/predict/batch", files=files, params={"top_k": 10})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["0.png", "1.png", "2.png", "3.png"]
    bad = results[1]
    assert bad["prediction"] is None
    assert bad["error"]["error"] == "not_an_image" and bad["error"]["detail"]
    direct = reference.probs(*good).double()
    for slot, expected in zip((0, 2, 3), direct, strict=True):
        assert results[slot]["error"] is None
        served = served_probs(results[slot]["prediction"])
        assert torch.allclose(served, expected, atol=TOLERANCE, rtol=0), slot


def test_batch_default_top_k_and_parameter(client: TestClient) -> None:
    files = images.uploads(images.png(13), images.png(14))
    default = client.post("/predict/batch", files=files).json()["results"]
    assert [len(r["prediction"]["top_k"]) for r in default] == [5, 5]
    two = client.post("/predict/batch", files=files, params={"top_k": 2}).json()["results"]
    assert [len(r["prediction"]["top_k"]) for r in two] == [2, 2]


def test_batch_of_only_bad_files_answers_each(client: TestClient) -> None:
    files = images.uploads(b"", b"GIF89a nonsense", images.png(15)[:60])
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    errors = [r["error"]["error"] for r in response.json()["results"]]
    assert errors[0] == "empty_file"
    assert errors[1] in ("not_an_image", "corrupt_image")
    assert errors[2] in ("not_an_image", "corrupt_image")
    assert all(r["prediction"] is None for r in response.json()["results"])


# ---- bad requests -----------------------------------------------------------------------------


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def big_png(side: int = 3000) -> bytes:
    return images.encode(Image.new("L", (side, side)), "PNG")


def cmyk_jpeg() -> bytes:
    return images.encode(Image.fromarray(images.noise(20, (40, 30))).convert("CMYK"), "JPEG")


BAD_UPLOADS = [
    pytest.param(b"", 400, "empty_file", id="empty"),
    pytest.param(b"%PDF-1.4 this is not an image\n" * 20, 415, "not_an_image", id="not-image"),
    pytest.param(
        images.encode(Image.new("RGB", (8, 8)), "TIFF"), 415, "unsupported_format", id="tiff"
    ),
    pytest.param(truncated(images.jpeg(21, (128, 128))), 400, "corrupt_image", id="trunc-jpeg"),
    pytest.param(truncated(images.png(22, (128, 128))), 400, "corrupt_image", id="trunc-png"),
    pytest.param(big_png(), 413, "too_many_pixels", id="3000x3000"),
    # The header alone says 3000x3000: refused before any pixel data is read.
    pytest.param(big_png()[:64], 413, "too_many_pixels", id="3000x3000-header-only"),
]


@pytest.mark.parametrize(("data", "status", "code"), BAD_UPLOADS)
def test_bad_upload_is_a_clear_client_error(
    client: TestClient, data: bytes, status: int, code: str
) -> None:
    assert_error(client.post("/predict", files=images.upload(data)), status, code)
    # The same file in a batch: an error in its slot, the others still predicted.
    response = client.post("/predict/batch", files=images.uploads(images.png(23), data))
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["prediction"] is not None
    assert second["error"]["error"] == code
    assert_healthy(client)


def chunks(total: int, size: int = 16_384) -> Iterator[bytes]:
    boundary_start = b"--xyz\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
    yield boundary_start
    for _ in range(total // size):
        yield b"\0" * size


def file_then_text(field: str) -> dict[str, Any]:
    """A form whose `field` holds an image and then a text value (httpx sends text first)."""
    body = (
        f"--xyz\r\nContent-Disposition: form-data; name={field}; filename=a.png\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + images.png()
    body += f"\r\n--xyz\r\nContent-Disposition: form-data; name={field}\r\n\r\nhello".encode()
    body += b"\r\n--xyz--\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=xyz"}}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        pytest.param({}, 422, "no_file", id="no-body"),
        pytest.param(
            {"files": images.upload(images.png(), field="image")}, 422, "no_file", id="wrong-field"
        ),
        pytest.param({"data": {"top_k": "3"}}, 422, "no_file", id="form-without-file"),
        pytest.param({"data": {"file": "hello"}}, 422, "no_file", id="text-instead-of-file"),
        pytest.param(
            {"files": images.upload(images.png()), "data": {"file": "hello"}},
            422,
            "not_a_file",
            id="text-beside-the-file",
        ),
        pytest.param(file_then_text("file"), 422, "not_a_file", id="text-after-the-file"),
        pytest.param(
            {"files": images.upload(b"\0" * (MAX_UPLOAD + 1))},
            413,
            "too_large",
            id="over-upload-limit",
        ),
        pytest.param(
            {
                "content": chunks(2 * MAX_UPLOAD),
                "headers": {"content-type": "multipart/form-data; boundary=xyz"},
            },
            413,
            "too_large",
            id="chunked-over-upload-limit",
        ),
        pytest.param(
            {"files": images.upload(images.png()), "params": {"top_k": 0}},
            422,
            "bad_top_k",
            id="top_k-0",
        ),
        pytest.param(
            {"files": images.upload(images.png()), "params": {"top_k": 11}},
            422,
            "bad_top_k",
            id="top_k-11",
        ),
        pytest.param(
            {"files": images.upload(images.png()), "params": {"top_k": "abc"}},
            422,
            "bad_top_k",
            id="top_k-abc",
        ),
        pytest.param(
            {"files": [("file", ("a.png", images.png(), "image/png"))] * 2},
            422,
            "too_many_files",
            id="two-files-in-field-file",
        ),
        pytest.param(
            {
                "files": [
                    ("file", ("a.png", images.png(), "image/png")),
                    *images.uploads(images.png()),
                ]
            },
            422,
            "unexpected_field",
            id="file-and-files",
        ),
    ],
)
def test_bad_request_to_predict(
    client: TestClient, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    assert_error(client.post("/predict", **request_kwargs), status, code)
    assert_healthy(client)


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        pytest.param({}, 422, "no_file", id="no-body"),
        pytest.param(
            {"files": images.upload(images.png(), field="file")}, 422, "no_file", id="wrong-field"
        ),
        pytest.param(
            {"files": images.uploads(images.png()), "data": {"files": "hello"}},
            422,
            "not_a_file",
            id="text-beside-the-files",
        ),
        pytest.param(file_then_text("files"), 422, "not_a_file", id="text-after-the-files"),
        pytest.param(
            {"files": images.uploads(*[images.png()] * (MAX_FILES + 1))},
            413,
            "too_many_files",
            id="too-many-files",
        ),
        pytest.param(
            {"files": images.uploads(*[b"x"] * 1001)},  # past the form parser's own ceiling
            413,
            "too_many_files",
            id="over-the-parser-limit",
        ),
        pytest.param(
            {"files": [*images.uploads(images.png()), ("file", ("a.png", images.png(), "x/y"))]},
            422,
            "unexpected_field",
            id="files-and-file",
        ),
        pytest.param(
            {"files": images.uploads(images.png()) * 2, "params": {"top_k": 11}},
            422,
            "bad_top_k",
            id="top_k-11",
        ),
        pytest.param(
            {"files": images.uploads(images.png()), "params": {"top_k": "x"}},
            422,
            "bad_top_k",
            id="top_k-x",
        ),
        pytest.param(
            {"files": images.uploads(b"\0" * MAX_UPLOAD, b"\0" * 10)},
            413,
            "too_large",
            id="over-upload-limit",
        ),
    ],
)
def test_bad_request_to_predict_batch(
    client: TestClient, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    assert_error(client.post("/predict/batch", **request_kwargs), status, code)
    assert_healthy(client)


def multipart(field: str, *parts: bytes, closed: bool = True, epilogue: bytes = b"") -> dict:
    """Request arguments for a hand-made multipart body (boundary XyZ), one part per image."""
    body = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="%s"; filename="%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n%s\r\n" % (field.encode(), n, part)
        for n, part in enumerate(parts)
    )
    if closed:
        body += b"--XyZ--\r\n" + epilogue
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=XyZ"}}


@pytest.mark.parametrize("path", ["/predict", "/predict/batch"])
def test_a_multipart_body_cut_short_is_a_400_not_a_missing_file(
    client: TestClient, path: str
) -> None:
    """Without this check the form parser drops an unfinished last part silently: the batch
    answered 200 without it, /predict said no file was sent."""
    field = "file" if path == "/predict" else "files"
    whole = multipart(field, images.png(1), images.png(2))
    cut = {**whole, "content": whole["content"][: -len(b"--XyZ--\r\n") - 300]}
    unclosed = multipart(field, images.png(1), closed=False)
    for request in (cut, unclosed):
        error = assert_error(client.post(path, **request), 400, "bad_request")
        assert "closing boundary" in error["detail"]
    # Complete bodies, with or without an epilogue after the closing boundary, are served.
    if path == "/predict":
        assert client.post(path, **multipart(field, images.png(1))).status_code == 200
        long_epilogue = multipart(field, images.png(1), epilogue=b"e" * 5000)  # RFC 2046 allows it
        assert client.post(path, **long_epilogue).status_code == 200
        # Streamed in 5-byte chunks: the closing boundary straddles several of them.
        body = long_epilogue["content"]
        chunks = (body[i : i + 5] for i in range(0, len(body), 5))
        streamed = {"content": chunks, "headers": long_epilogue["headers"]}
        assert client.post(path, **streamed).status_code == 200
    else:
        served = client.post(path, **multipart(field, images.png(1), images.png(2), epilogue=b"x"))
        assert served.status_code == 200 and len(served.json()["results"]) == 2
    assert_healthy(client)


def test_unknown_path_and_wrong_method_are_json_errors(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


# ---- image modes ------------------------------------------------------------------------------


def mode_png(mode: str) -> bytes:
    return images.encode(Image.fromarray(images.noise(30, (36, 28))).convert(mode), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.fromarray(images.noise(31, (33, 33))).convert("P")
    return images.encode(image, "PNG", transparency=0)


def sixteen_bit_png() -> bytes:
    """Values up to 60,000: a plain convert("L") would clip nearly all of them to white."""
    array = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    data = images.encode(image, "PNG")
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode.startswith("I")  # read back as 16-bit, not as 8-bit
    return data


def exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(images.noise(32, (60, 30)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return images.encode(image, "JPEG", quality=95, exif=exif)


def animated_gif() -> bytes:
    frames = [Image.fromarray(images.noise(seed, (30, 30))).convert("P") for seed in (33, 34)]
    return images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


IMAGE_MODES = [
    pytest.param(lambda: mode_png("L"), id="grayscale-L"),
    pytest.param(lambda: mode_png("LA"), id="grayscale-alpha-LA"),
    pytest.param(lambda: mode_png("P"), id="palette-P"),
    pytest.param(palette_with_transparency, id="palette-transparent"),
    pytest.param(lambda: mode_png("RGBA"), id="RGBA"),
    pytest.param(cmyk_jpeg, id="CMYK-jpeg"),
    pytest.param(sixteen_bit_png, id="16-bit-png"),
    pytest.param(exif_rotated_jpeg, id="exif-rotated-jpeg"),
    pytest.param(animated_gif, id="animated-gif"),
    pytest.param(lambda: images.encode(Image.fromarray(images.noise(35)), "BMP"), id="bmp"),
    pytest.param(
        lambda: images.encode(Image.fromarray(images.noise(36)), "WEBP", lossless=True), id="webp"
    ),
]


@pytest.mark.parametrize("make", IMAGE_MODES)
def test_every_image_mode_is_predicted_like_training_sees_it(
    client: TestClient, reference: Reference, make: Any
) -> None:
    data = make()
    served = served_probs(predict(client, data, top_k=10))
    direct = reference.probs(data)[0].double()
    assert torch.allclose(served, direct, atol=TOLERANCE, rtol=0), (served, direct)


def test_exif_rotation_is_applied(client: TestClient, reference: Reference) -> None:
    """The rotated JPEG is predicted as its upright pixels, not as stored."""
    data = exif_rotated_jpeg()
    with Image.open(io.BytesIO(data)) as stored:
        upright = stored.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    served = served_probs(predict(client, data, top_k=10))
    as_upright = reference.probs(images.encode(upright, "PNG"))[0].double()
    assert torch.allclose(served, as_upright, atol=TOLERANCE, rtol=0)


# ---- /metrics ---------------------------------------------------------------------------------


def test_metrics_count_requests_batches_and_latency(client: TestClient) -> None:
    before = parse_metrics(client.get("/metrics").text)
    predict(client, images.png(40))
    client.post("/predict", files=images.upload(b"not an image"))
    client.post("/predict/batch", files=images.uploads(images.png(41), images.png(42)))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = parse_metrics(response.text)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    ok = {"endpoint": "/predict", "method": "POST", "status": "200"}
    assert delta("http_requests_total", **ok) == 1
    assert delta("http_requests_total", **{**ok, "status": "415"}) == 1
    assert delta("http_requests_total", **{**ok, "endpoint": "/predict/batch"}) == 1
    assert delta("http_request_duration_seconds_count", endpoint="/predict") == 2
    assert delta("http_request_duration_seconds_bucket", endpoint="/predict", le="+Inf") == 2
    assert delta("inference_batch_size_count") >= 2  # 1 + 2 images: one or two passes
    assert delta("inference_batch_size_sum") == 3
    assert delta("images_predicted_total") == 3
    assert delta("image_errors_total", reason="not_an_image") == 1
    assert delta("image_decode_seconds_count") == 4  # every upload, the refused one too
    assert delta("image_decode_seconds_sum") > 0
    assert ("inference_queue_depth", frozenset()) in after
    assert sample(after, "inference_queue_depth") == 0


def test_a_body_refused_before_routing_counts_under_its_endpoint(client: TestClient) -> None:
    before = parse_metrics(client.get("/metrics").text)
    for path in ("/predict", "/predict/batch", "/no-such-path"):
        response = client.post(path, files=images.upload(b"\0" * (MAX_UPLOAD + 1)))
        assert response.status_code == 413  # from Content-Length, before any route ran
    after = parse_metrics(client.get("/metrics").text)
    for endpoint in ("/predict", "/predict/batch", "other"):  # unknown paths stay one label
        labels = {"endpoint": endpoint, "method": "POST", "status": "413"}
        assert (
            sample(after, "http_requests_total", **labels)
            - sample(before, "http_requests_total", **labels)
            == 1
        ), endpoint


def test_exact_ties_go_to_the_lower_class_id_as_argmax_does() -> None:
    """bf16 logits tie exactly now and then; the served label must be the one argmax (offline
    evaluation) picks."""
    from app.routes import to_prediction

    probs = torch.tensor([0.368, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.368])  # a real case
    for k in (1, 3, 5):  # torch.topk happens to put class 9 first here
        prediction = to_prediction(probs, CLASSES, k)
        assert prediction.class_id == int(probs.argmax()) == 0
        assert [s.class_id for s in prediction.top_k][:2] == [0, 9][:k]
    five = torch.full((10,), 0.0).index_fill(0, torch.arange(5), 0.2)
    assert [s.class_id for s in to_prediction(five, CLASSES, 5).top_k] == [0, 1, 2, 3, 4]
