"""Prometheus metrics, in a registry per app (so several apps, e.g. in tests, never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.queue_depth = Gauge(
            "inference_queue_depth", "images waiting for the model", registry=r
        )
        self.images = Counter("images_predicted", "images answered with a prediction", registry=r)
        self.image_errors = Counter(
            "image_errors", "uploads refused as images, by reason", ["reason"], registry=r
        )
