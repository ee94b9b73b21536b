"""The model on its device: load, warm up, and turn a batch of 32x32 uint8 images into
probabilities, through the same preprocessing and forward code that training evaluates with."""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.artifact import InferenceModel, load_for_inference
from training.engine import Precision, forward_logits, prepare_for_inference
from training.preprocess import InputTransform
from training.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    loaded: InferenceModel
    device: torch.device
    precision: str  # "fp32" or "bf16", resolved
    transform: InputTransform = field(init=False)
    _precision: Precision = field(init=False)
    warmup_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._precision = prepare_for_inference(self.loaded.model, self.device, self.precision)
        self.transform = InputTransform(self.loaded.preprocessing).to(self.device)

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    @property
    def source_size(self) -> int:
        return self.loaded.preprocessing.source_size

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 32, 32] on the CPU -> float32 probabilities [B, classes] on the CPU."""
        x = images.to(self.device, non_blocking=True)
        logits = forward_logits(self.loaded.model, self.transform, x, self._precision)
        return logits.float().softmax(dim=1).cpu()

    def _seconds_per_batch(self, images: torch.Tensor) -> float:
        self.predict(images[:1])
        self.predict(images)
        start = time.perf_counter()
        self.predict(images)
        return time.perf_counter() - start

    def warm_up(self, max_batch_size: int, choose_precision: bool) -> None:
        """Run the shapes we will serve once (cuDNN autotuning, allocator, lazy init); on a CPU
        with `choose_precision`, time fp32 against bf16 and keep the faster.

        The bf16 trial runs on a copy: casting the served weights down and back up would leave
        "fp32" serving bf16-rounded weights.
        """
        size = self.source_size
        full = torch.randint(0, 256, (max_batch_size, 3, size, size), dtype=torch.uint8)
        timings = {self.precision: self._seconds_per_batch(full)}
        if choose_precision and self.precision == "fp32":
            fp32_model, fp32_precision = self.loaded.model, self._precision
            self.loaded.model = copy.deepcopy(fp32_model)
            self._precision = prepare_for_inference(self.loaded.model, self.device, "bf16")
            timings["bf16"] = self._seconds_per_batch(full)
            if timings["bf16"] < timings["fp32"]:
                self.precision = "bf16"
            else:
                self.loaded.model, self._precision = fp32_model, fp32_precision
        self.warmup_report = {
            "batch": max_batch_size,
            "seconds_per_batch": {k: round(v, 4) for k, v in timings.items()},
            "chosen": self.precision,
        }
        log.info("warm-up on %s: %s", self.device, self.warmup_report)


def load_predictor(checkpoint: Path, device_spec: str, precision: str) -> Predictor:
    """Load the model (CheckpointError/UserError on any problem) and place it on its device.

    The work runs in a thread of its own that ends with it. Why: the OpenMP runtime behind
    PyTorch's CPU ops (libgomp) keeps a pool of worker threads for every thread that has run a
    parallel op, for as long as that thread lives, and once all pools together hold more threads
    than there are cores, its workers stop spinning at the barriers between ops and sleep on a
    futex instead. Loading on the server's main thread left it such a pool next to the
    inference thread's, and each forward pass then slept and woke at nearly every op: on 2
    vCPUs, 17-18% of the CPU idle at concurrency 32 (6-7% without) and 0.98-3.64 ms more p50
    latency at concurrency 1 (README, "Serving speed").
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
    try:
        return pool.submit(_load, checkpoint, device_spec, precision).result()
    finally:
        # Not waiting: after a result the thread is ending anyway; after a Ctrl-C (raised
        # here, on the main thread) it may be seconds inside torch, and the caller decides.
        pool.shutdown(wait=False)


def _load(checkpoint: Path, device_spec: str, precision: str) -> Predictor:
    device = resolve_device(device_spec)
    loaded = load_for_inference(checkpoint)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"  # CPU: decided at warm-up
    return Predictor(loaded, device, precision)
