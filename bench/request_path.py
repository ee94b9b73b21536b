"""Where the service's speed goes, layer by layer: its request path in one process, no HTTP.

    python -m bench.request_path [--checkpoint weights] [--cycles 24] [--slice 0.75]

`bench.serve_load` measures the whole service (a server process, a client on the same CPU)
against the model alone. This benchmark takes the request path apart, in one process that
loads the model once, as the service does (a loader thread; one inference thread; the decoding
pool), and drives it directly from --concurrency callers on the event loop:

  model alone     batches of --batch pre-decoded images through the batcher, one at a time
  batcher         one pre-decoded image per call: dynamic batching, and the event loop's
                  hand-offs to and from the inference thread
  + decoding      one JPEG per call, decoded in the service's pool, then the batcher
  the app         one JPEG per call through the service's ASGI app (its middleware, routing,
                  multipart parsing, validation, JSON), as uvicorn would call it

Each level adds one layer to the one above it. The shared vCPUs of a development machine
change speed by 2x and more from one second to the next, so the levels take turns in short
slices (--slice seconds each, in a rotating order, for --cycles cycles) and each is reported
over all its slices: drift spreads over all levels alike. Per-cycle ratios show the spread.
What this leaves out: uvicorn's HTTP parsing and the client's CPU, which `bench.serve_load`
includes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.decoding import decode_upload
from app.main import create_app, state_of
from app.predictor import load_predictor
from app.settings import Settings
from app.state import ServingState
from bench import model_alone, serve_load
from bench.cli import fail, positive_int
from bench.serve_load import BOUNDARY, jpeg_uploads, multipart_body
from training.errors import UserError

LEVELS = ("model alone", "batcher", "+ decoding", "the app")
TIMEOUT_S = 60.0


@dataclass
class Window:
    images: int
    seconds: float
    loop_cpu_s: float
    batches: float  # forward passes run in the window
    batch_images: float  # images in them

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mean_batch(self) -> float:
        return self.batch_images / self.batches if self.batches else float("nan")


def asgi_post(app: Any, body: bytes) -> Callable[[], Awaitable[None]]:
    """One POST /predict?top_k=1 through `app`, as uvicorn calls it: the body in one message,
    then (the answer sent) the disconnect that the service's handler watches for."""
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]

    async def call() -> None:
        answered = asyncio.Event()
        body_sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                answered.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/predict", "raw_path": b"/predict",
            "query_string": b"top_k=1", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
        if status != 200:
            raise RuntimeError(f"the app answered {status}")

    return call


class Levels:
    """The calls of each level: each returns when its images are answered."""

    def __init__(self, app: Any, state: ServingState, jpegs: list[bytes], batch: int) -> None:
        assert state.predictor is not None and state.batcher is not None
        self.state, self.batcher = state, state.batcher
        # The service's decoding, to its model's source size, under its pixel limit.
        self.decode = functools.partial(
            decode_upload,
            max_pixels=state.settings.max_image_pixels,
            size=state.predictor.source_size,
        )
        self.images = [self.decode(j) for j in jpegs]
        self.jpegs, self.batch = jpegs, batch
        self.posts = [asgi_post(app, multipart_body(j)) for j in jpegs]

    def call(self, level: str, i: int) -> Callable[[], Awaitable[int]]:
        n = len(self.jpegs)
        if level == "model alone":
            images = [self.images[(i + k) % n] for k in range(self.batch)]
            return lambda: self._predict(images)
        if level == "batcher":
            return lambda: self._predict([self.images[i % n]])
        if level == "+ decoding":
            return lambda: self._decode_then_predict(self.jpegs[i % n])
        post = self.posts[i % n]

        async def through_app() -> int:
            await post()
            return 1

        return through_app

    async def _predict(self, images: list[torch.Tensor]) -> int:
        with self.batcher.incoming() as ticket:
            await self.batcher.predict(images, TIMEOUT_S, ticket)
        return len(images)

    async def _decode_then_predict(self, jpeg: bytes) -> int:
        with self.batcher.incoming() as ticket:
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self.state.decoders, self.decode, jpeg)
            await self.batcher.predict([image], TIMEOUT_S, ticket)
        return 1


def _batch_totals(state: ServingState) -> tuple[float, float]:
    registry = state.metrics.registry
    count = registry.get_sample_value("inference_batch_size_count") or 0.0
    total = registry.get_sample_value("inference_batch_size_sum") or 0.0
    return count, total


async def drive(
    levels: Levels, level: str, concurrency: int, seconds: float, warmup: float
) -> Window:
    """Closed-loop callers: each sends its next call when the last is answered, until the
    window ends. A call's images count in proportion to the share of its time inside the
    window: counting whole answers instead would make a level whose answers come in large
    batches (the model alone: 32 images every ~0.15 s) jump by a batch per window."""
    callers = 1 if level == "model alone" else concurrency
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + warmup
    stop_at = measure_from + seconds
    answered = 0.0

    async def caller(k: int) -> None:
        nonlocal answered
        i = k
        while (start := loop.time()) < stop_at:
            n = await levels.call(level, i)()
            end = loop.time()
            inside = min(end, stop_at) - max(start, measure_from)
            if inside > 0:
                answered += n * inside / max(end - start, 1e-9)
            i += callers

    async def window() -> tuple[float, tuple[float, float], float, tuple[float, float]]:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        cpu, batches = time.thread_time(), _batch_totals(levels.state)
        await asyncio.sleep(max(0.0, stop_at - loop.time()))
        return cpu, batches, time.thread_time(), _batch_totals(levels.state)

    *_, (cpu0, (n0, s0), cpu1, (n1, s1)) = await asyncio.gather(
        *(caller(k) for k in range(callers)), window()
    )
    return Window(answered, seconds, cpu1 - cpu0, n1 - n0, s1 - s0)


def total(windows: list[Window]) -> Window:
    return Window(
        sum(w.images for w in windows), sum(w.seconds for w in windows),
        sum(w.loop_cpu_s for w in windows), sum(w.batches for w in windows),
        sum(w.batch_images for w in windows),
    )  # fmt: skip


def load_state(
    checkpoint: Path, device: str, precision: str, max_batch: int, delay_ms: float
) -> tuple[Any, ServingState]:
    settings = Settings(
        checkpoint=checkpoint, device=device, precision=precision,
        max_batch_size=max_batch, max_batch_delay_ms=delay_ms, max_queue=4096,
    )  # fmt: skip
    app = create_app(settings)
    state = state_of(app)
    refused: list[UserError] = []

    def load() -> None:
        # The checkpoint is loaded here, not by load_and_warm_up (which takes the predictor
        # it is given): a missing or foreign one is then this tool's one `error:` line, not
        # the service's logged error followed by ours, with the path redacted.
        try:
            state.predictor = load_predictor(checkpoint, device, precision)
        except UserError as exc:
            refused.append(exc)
            return
        state.load_and_warm_up()

    # As the service does: load in a thread that ends, so that the main thread (the event
    # loop) keeps no OpenMP thread pool of its own next to the inference thread's.
    loader = threading.Thread(target=load, name="model-loader")
    loader.start()
    loader.join()
    if refused:
        fail(str(refused[0]))
    if state.status != "ok":
        fail(str(state.detail))
    return app, state


def median_range(values: list[float]) -> str:
    median, low, high = serve_load.median_range(values)
    return f"{median:.1f} ({low:.1f}-{high:.1f})"


async def run(args: argparse.Namespace, app: Any, state: ServingState) -> dict[str, list[Window]]:
    levels = Levels(app, state, jpeg_uploads(64), args.batch)
    for level in LEVELS:  # first calls: lazy imports, caches, the first batches' allocations
        await drive(levels, level, args.concurrency, 0.0, 1.0)
    windows: dict[str, list[Window]] = {level: [] for level in LEVELS}
    for c in range(args.cycles):
        order = LEVELS[c % len(LEVELS) :] + LEVELS[: c % len(LEVELS)]
        for level in order:
            w = await drive(levels, level, args.concurrency, args.slice, args.slice_warmup)
            windows[level].append(w)
        print(f"cycle {c + 1}: " + ", ".join(
            f"{level} {windows[level][-1].images_per_s:.0f}" for level in LEVELS
        ) + " images/s", file=sys.stderr)  # fmt: skip
    return windows


def report(args: argparse.Namespace, state: ServingState, windows: dict[str, list[Window]]) -> None:
    predictor = state.predictor
    assert predictor is not None
    print(f"\ndevice: {predictor.device}, precision {predictor.precision}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} torch threads, concurrency "
          f"{args.concurrency}, max_batch_size {args.max_batch_size}, {args.cycles} cycles of "
          f"{args.slice:g} s per level\n")  # fmt: skip
    print("| level | images/s over all cycles | vs model alone | per cycle: median (range) "
          "| mean batch | event-loop CPU ms per image |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    alone = windows["model alone"]
    alone_total = total(alone)
    for level in LEVELS:
        ws, all_ = windows[level], total(windows[level])
        ratios = [w.images_per_s / a.images_per_s * 100 for w, a in zip(ws, alone, strict=True)]
        label = f"model alone (batch {args.batch})" if level == "model alone" else level
        print(f"| {label} | {all_.images_per_s:.1f} | "
              f"{all_.images_per_s / alone_total.images_per_s * 100:.1f}% | "
              f"{median_range(ratios)}% | {all_.mean_batch:.1f} | "
              f"{all_.loop_cpu_s / all_.images * 1000:.3f} |")  # fmt: skip


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.request_path", description=__doc__.split("\n\n")[0]
    )
    model_alone.add_model_arguments(parser)
    # Counts checked here: `--cycles 0` failed with ZeroDivisionError after the model loaded.
    parser.add_argument("--concurrency", type=positive_int, default=32, help="callers at once")
    parser.add_argument(
        "--batch", type=positive_int, default=32, help="the model alone's batch size"
    )
    parser.add_argument("--max-batch-size", type=positive_int, default=32)
    parser.add_argument("--delay-ms", type=float, default=2.0, help="max_batch_delay_ms")
    parser.add_argument("--cycles", type=positive_int, default=24, help="rounds through the levels")
    parser.add_argument(
        "--slice", type=float, default=0.75, help="measured seconds per level and cycle"
    )
    parser.add_argument(
        "--slice-warmup", type=float, default=0.25,
        help="unmeasured seconds before each slice (the level's batches settle)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.slice <= 0 or args.slice_warmup < 0:
        parser.error("--slice must be more than 0 and --slice-warmup 0 or more")
    if args.batch > args.max_batch_size:
        parser.error("--batch must be at most --max-batch-size (one forward pass per call)")
    app, state = load_state(
        args.checkpoint, args.device, args.precision, args.max_batch_size, args.delay_ms
    )
    try:
        # The event loop uvicorn runs the service on: uvloop where it is installed.
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            windows = runner.run(run(args, app, state))
    finally:
        assert state.batcher is not None
        state.batcher.stop(TIMEOUT_S)
        state.decoders.shutdown()
    report(args, state, windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
