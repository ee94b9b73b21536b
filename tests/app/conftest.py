"""Fixtures of the app tests: a small random-weight model, written once per session both as an
exported artifact (weights/) and as a training checkpoint file (last.pt), and in-process apps
driven by TestClient (which runs the lifespan: the model loads on a background thread)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.predictor import Predictor, load_predictor
from app.settings import Settings
from tests.app.support import Reference, Server, make_checkpoint, start_server
from training.artifact import export_artifact
from training.checkpoint import save_atomic

# Small batches keep each app's warm-up short on a CPU.
BASE_SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "precision": "fp32",
    "max_batch_size": 4,
    "max_batch_delay_ms": 2.0,
}
READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class ServedModel:
    artifact: Path  # an exported folder: model.json + safetensors shards
    checkpoint: Path  # the same weights as a training checkpoint file


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    root = tmp_path_factory.mktemp("served-model")
    ckpt = make_checkpoint()
    # As `training.export --data-dir` records it (here: the checkpoint's own figures).
    export_artifact(ckpt, root / "weights", extra={"export": {"test": ckpt["test"]}})
    save_atomic(ckpt, root / "last.pt")
    yield ServedModel(root / "weights", root / "last.pt")
    shutil.rmtree(root, ignore_errors=True)  # ~290 MB


@pytest.fixture(scope="session")
def artifact(served_model: ServedModel) -> Path:
    return served_model.artifact


@pytest.fixture(scope="session")
def reference(artifact: Path) -> Reference:
    """The artifact's model, run directly through the training code."""
    return Reference(artifact)


@pytest.fixture(scope="session")
def shared_predictor(artifact: Path) -> Predictor:
    """One loaded fp32 predictor, handed to apps that only differ in their settings (saves a
    load per app; apps in these tests never run at the same time)."""
    return load_predictor(artifact, "cpu", "fp32")


def wait_ready(client: TestClient, status: str = "ok") -> None:
    state = client.app.state.serving  # type: ignore[attr-defined]
    assert state.ready.wait(READY_TIMEOUT_S), "the model did not load in time"
    assert state.status == status, state.detail


ServeFactory = Callable[..., TestClient]


@pytest.fixture
def serve(artifact: Path, shared_predictor: Predictor) -> Iterator[ServeFactory]:
    """`serve(**settings)` -> a started TestClient on a new app, closed after the test.

    By default the app gets the shared predictor and the call waits until it is ready;
    `load=True` (implied by another checkpoint or precision) makes the app load its model
    itself; `wait=False` returns at once."""
    with ExitStack() as stack:

        def start(*, load: bool = False, wait: bool = True, **overrides: Any) -> TestClient:
            load = load or "checkpoint" in overrides or "precision" in overrides
            settings = Settings(**{**BASE_SETTINGS, "checkpoint": artifact, **overrides})
            app = create_app(settings, None if load else shared_predictor)
            client = stack.enter_context(TestClient(app))
            if wait:
                wait_ready(client)
            return client

        yield start


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(artifact, tmp_path_factory.mktemp("server") / "server.log")
    yield server
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
