"""Prometheus metrics, in a registry per app (so several apps, e.g. in tests, never clash).

With several server processes (`--workers N`), the CLI sets PROMETHEUS_MULTIPROC_DIR before
they start; prometheus-client then keeps every process's values in files there, and /metrics
reports their sum, whichever process answers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "inference_batch_seconds", "time of one forward pass, device transfer included",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_seconds = Histogram(
            "image_decode_seconds", "time to decode one upload to 32x32 (worker thread), bad ones too",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "inference_queue_depth",
            "images waiting for the model",
            registry=r,
            multiprocess_mode="livesum",  # with several processes: their total
        )
        self.images = Counter("images_predicted", "images answered with a prediction", registry=r)
        self.image_errors = Counter(
            "image_errors", "uploads refused as images, by reason", ["reason"], registry=r
        )

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of all processes in multiprocess mode."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
