"""The shipped model (weights/) serves real predictions out of the box."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.helpers import ROOT

WEIGHTS = ROOT / "weights"
SAMPLES = ROOT / "tests" / "data" / "cifar10-samples"  # one real CIFAR-10 test image per class


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_app(Settings(checkpoint=WEIGHTS, device="cpu", precision="auto"))
    with TestClient(app) as c:
        assert app.state.serving.ready.wait(120)
        assert c.get("/health").json()["status"] == "ok", c.get("/health").json()
        yield c


def test_shipped_artifact_is_within_the_size_limits() -> None:
    index = json.loads((WEIGHTS / "model.json").read_text())
    sizes = [(WEIGHTS / name).stat().st_size for name in index["files"]]
    assert max(sizes) <= 15 * 1024 * 1024
    assert sum(sizes) + (WEIGHTS / "model.json").stat().st_size <= 64_000_000
    for name, meta in index["files"].items():  # the model card's checksums are the real ones
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == meta["sha256"]
        assert meta["sha256"] in (WEIGHTS / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.jpg")), ids=lambda p: p.stem)
def test_real_images_get_their_labels(client: TestClient, path: Path) -> None:
    response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == path.stem


@pytest.mark.slow
def test_model_reports_the_recorded_accuracy(client: TestClient) -> None:
    index = json.loads((WEIGHTS / "model.json").read_text())
    info = client.get("/model").json()
    assert info["checkpoint_format"] == "artifact"
    # The artifact's own accuracy, measured after quantization, next to the checkpoint's.
    assert info["accuracy"]["test"] == round(index["export"]["test"]["accuracy"], 2)
    assert info["accuracy"]["checkpoint_test"] == round(index["test"]["accuracy"], 2)
    assert info["accuracy"]["test"] > 85.0
    assert info["recipe"] == index["recipe"] == "fast"
    assert info["sha256"] == hashlib.sha256((WEIGHTS / "model.json").read_bytes()).hexdigest()
    assert info["classes"] == [p.stem for p in sorted(SAMPLES.glob("*.jpg"))]
