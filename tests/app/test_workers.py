"""Several server processes (`--workers 2`): every one serves, and /metrics sums them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.images import jpeg
from tests.app.support import free_port, parse_metrics, sample
from tests.helpers import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_two_workers_serve_and_report_together(artifact: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        sys.executable, "-m", "app", "--checkpoint", str(artifact), "--port", str(port),
        "--device", "cpu", "--precision", "fp32", "--workers", "2", "--threads", "1",
    ]  # fmt: skip
    log = tmp_path / "server.log"
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
        while True:  # the first process up; the other may still be warming (503s are skipped)
            assert process.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        before = parse_metrics(httpx.get(url + "/metrics").text)
        sent = 0
        for i in range(8):
            with httpx.Client() as client:  # new connections spread over the processes
                response = client.post(
                    url + "/predict", files={"file": ("x.jpg", jpeg(seed=i))}, timeout=30
                )
            if response.status_code == 503:  # the other worker still warming up
                continue
            assert response.status_code == 200, response.text
            sent += 1
        after = parse_metrics(httpx.get(url + "/metrics").text)
        assert sent >= 4
        served = sample(
            after, "http_requests_total", endpoint="/predict", method="POST", status="200"
        ) - sample(before, "http_requests_total", endpoint="/predict", method="POST", status="200")
        assert served == sent  # summed over both processes, whichever one answered the scrape
        assert (
            sample(after, "inference_batch_size_count")
            - sample(before, "inference_batch_size_count")
            == sent
        )
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    assert "Traceback" not in log.read_text()
