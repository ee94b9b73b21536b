"""Helpers of the app tests: the served model's checkpoint, a reference forward pass through
the training code, error-body and metrics checks."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, cli_env
from training.artifact import load_for_inference
from training.checkpoint import FORMAT, FORMAT_VERSION, library_versions, model_section
from training.model import AlexNet, AlexNetConfig
from training.preprocess import InputTransform, Preprocessing, reduce_image

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
TEST_ACCURACY = 12.5  # what the fixture's checkpoint records as its test accuracy
API_KEY = "correct horse battery staple"


def make_checkpoint(seed: int = 0) -> dict[str, Any]:
    """A training checkpoint as training/trainer.py writes it, with random weights. The last
    layer is scaled up so that the (otherwise near-uniform) outputs differ between images."""
    torch.manual_seed(seed)
    config = AlexNetConfig(num_classes=len(CLASSES))
    model = AlexNet(config)
    with torch.no_grad():
        model.fc3.weight.mul_(200)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "training",
        "model": model_section(model.state_dict(), config),
        "classes": list(CLASSES),
        "preprocessing": Preprocessing().to_dict(),
        "recipe": "seed",
        "config": {"recipe": "seed", "epochs": 3},
        "epoch": 3,
        "step": 30,
        "metrics": [{"epoch": e, "val_acc": 10.0 + e, "elapsed_s": 1.0 * e} for e in (1, 2, 3)],
        "best": {"epoch": 3, "val_acc": 13.0},
        "test": {
            "accuracy": TEST_ACCURACY,
            "images": 80,
            "per_class": {name: float(i) for i, name in enumerate(CLASSES)},
        },
        "data": {"source": "generated", "train": 64, "valid": 16, "test": 80},
        "versions": library_versions(),
        "world_size": 1,
    }


class Reference:
    """The served model computed directly with the training code: reduce_image (stage 1),
    InputTransform (stage 2), the network in fp32, softmax."""

    def __init__(self, path: Path) -> None:
        loaded = load_for_inference(path)
        self.model = loaded.model.eval()
        self.prep = loaded.preprocessing
        self.transform = InputTransform(self.prep)

    @torch.inference_mode()
    def probs(self, *uploads: bytes) -> torch.Tensor:
        """[len(uploads), classes] probabilities, for encoded image files."""
        images = [reduce_image(Image.open(io.BytesIO(u)), self.prep.source_size) for u in uploads]
        return self.model(self.transform(torch.stack(images))).softmax(dim=1)


def served_probs(prediction: dict[str, Any]) -> torch.Tensor:
    """The probability vector of a /predict answer made with top_k=10, by class id."""
    probs = torch.zeros(len(CLASSES), dtype=torch.float64)
    for entry in prediction["top_k"]:
        probs[entry["class_id"]] = entry["probability"]
    return probs


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """`status`, and a JSON body of exactly {"error": code, "detail": <message>} that gives away
    no file path and no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert_no_internals(response.text)
    return body


def assert_no_internals(text: str) -> None:
    assert "Traceback" not in text, text
    assert 'File "' not in text, text
    for fragment in ("/tmp", "/work", "/home", "pytest-", '.py"', ".py:", "site-packages"):
        assert fragment not in text, (fragment, text)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a labelled counter not incremented yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def batch_sizes_over_one(samples: Samples) -> float:
    """How many forward passes had more than one image (from inference_batch_size)."""
    total = sample(samples, "inference_batch_size_count")
    return total - sample(samples, "inference_batch_size_bucket", le="1.0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a real `python -m app` subprocess ------------------------------------------------------

MAX_UPLOAD = 200_000
MAX_BATCH = 16
START_TIMEOUT_S = 90
READ_TIMEOUT_S = 2  # short, for the tests of clients that stall


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(artifact: Path, log: Path, uvicorn_args: list[str] | None = None) -> Server:
    """`python -m app` on `artifact`; with `uvicorn_args`, `python -m uvicorn` with those
    arguments (and the port) instead, the same settings given as APP_* variables."""
    port = free_port()
    settings = {
        "checkpoint": str(artifact), "device": "cpu", "precision": "fp32",
        "max_batch_size": str(MAX_BATCH), "max_batch_delay_ms": "300",
        "max_upload_bytes": str(MAX_UPLOAD), "graceful_shutdown_s": "60",
        "read_timeout_s": str(READ_TIMEOUT_S), "log_level": "info",
    }  # fmt: skip
    if uvicorn_args is None:
        args = [sys.executable, "-m", "app", "--port", str(port)]
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", value]
        env = cli_env()
    else:
        args = [sys.executable, "-m", "uvicorn", *uvicorn_args, "--port", str(port)]
        env = cli_env(**{f"APP_{name.upper()}": value for name, value in settings.items()})
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", port, log)
    pause = threading.Event()
    for _ in range(START_TIMEOUT_S * 10):
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        pause.wait(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"no 200 from /health in {START_TIMEOUT_S} s:\n{server.output()}")
