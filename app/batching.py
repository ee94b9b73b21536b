"""Dynamic batching: concurrent requests' images share one forward pass.

Request handlers (on the event loop) put images on a queue and await futures. One inference
thread per server process (and so per device) takes the first waiting image, then gathers
more until the batch holds `max_batch_size` images or `max_batch_delay_ms` have passed since
that first image arrived, whichever comes first. It also closes a batch early when nothing else is on its way (no
request is still decoding), so a lone request never waits for company it will not get.
The event loop never runs the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from app.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More images waiting than `max_queue`: the client should retry later (503)."""


class DeadlineExceeded(Exception):
    """The request waited past its deadline (504)."""


@dataclass
class _Item:
    image: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float = field(default=0.0)


_STOP = object()


@dataclass
class Ticket:
    """A request announced by `DynamicBatcher.incoming`."""

    arrived: bool = False


def _resolve(future: asyncio.Future[torch.Tensor], result: torch.Tensor | BaseException) -> None:
    if future.done():  # cancelled: its client left or its deadline passed
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


_Result = tuple[asyncio.Future[torch.Tensor], torch.Tensor | BaseException]


def _resolve_all(results: list[_Result]) -> None:
    for future, result in results:
        _resolve(future, result)


class DynamicBatcher:
    def __init__(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self._metrics = metrics
        # SimpleQueue is written in C: cheaper than Queue on every request.
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # images queued, not yet in a batch
        self._incoming = 0  # requests decoding, whose images will arrive soon
        self._thread: threading.Thread | None = None

    # ---- the event-loop side ----------------------------------------------------------------

    @contextmanager
    def incoming(self) -> Iterator[Ticket]:
        """Announce a request that is still decoding: open batches wait (up to their delay)
        for its images. The announcement ends when `predict` enqueues them, or on error."""
        ticket = Ticket()
        with self._lock:
            self._incoming += 1
        try:
            yield ticket
        finally:
            with self._lock:
                if not ticket.arrived:
                    self._incoming -= 1
                    ticket.arrived = True

    async def predict(
        self, images: list[torch.Tensor], timeout_s: float, ticket: Ticket | None = None
    ) -> list[torch.Tensor]:
        """Probabilities for each image, in order; QueueFull or DeadlineExceeded otherwise."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if ticket is not None and not ticket.arrived:
                self._incoming -= 1
                ticket.arrived = True
            if self._waiting + len(images) > self.max_queue:
                raise QueueFull(
                    f"{self._waiting} images are already waiting (limit {self.max_queue})"
                )
            self._waiting += len(images)
            self._metrics.queue_depth.set(self._waiting)
        if not images:
            return []
        now = time.monotonic()
        items = [_Item(image, loop.create_future(), loop, now, now + timeout_s) for image in images]
        for item in items:
            self._queue.put(item)
        futures = [item.future for item in items]
        try:
            # One future at a time, not gather(): a gather cancelled as the loop shuts down
            # (uvicorn's forced exit) was logged as 'exception was never retrieved'.
            async with asyncio.timeout(timeout_s):
                return [await f for f in futures]
        except TimeoutError:
            raise DeadlineExceeded(f"no result within {timeout_s:g} s") from None
        finally:
            for f in futures:  # a client gone or a deadline passed: the worker skips these
                f.cancel()

    # ---- the inference thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish what is queued, then end the inference thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)

    def _take(self) -> None:
        with self._lock:
            self._waiting -= 1
            self._metrics.queue_depth.set(self._waiting)

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        close_at = first.enqueued + self.max_batch_delay_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    coming = self._incoming
                remaining = close_at - time.monotonic()
                if coming == 0 or remaining <= 0:
                    break  # nothing on its way, or the delay is over
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP:
                return batch, True
            self._take()
            batch.append(nxt)  # type: ignore[arg-type]
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            self._take()
            batch, stopping = self._collect(first)  # type: ignore[arg-type]
            now = time.monotonic()
            live = [i for i in batch if not i.future.done() and i.deadline > now]
            if not live:
                continue
            self._run_batch(live)
        # Drain: whatever was queued behind the stop marker still gets an answer.
        rest = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._take()
                rest.append(item)
        for start in range(0, len(rest), self.max_batch_size):
            self._run_batch(rest[start : start + self.max_batch_size])  # type: ignore[arg-type]

    def _run_batch(self, items: list[_Item]) -> None:
        self._metrics.batch_size.observe(len(items))
        start = time.perf_counter()
        try:
            probs: torch.Tensor | BaseException = self._predict(
                torch.stack([i.image for i in items])
            )
        except Exception as exc:  # reported to each request as a 500, logged once here
            log.exception("inference failed for a batch of %d", len(items))
            probs = exc
        self._metrics.inference_seconds.observe(time.perf_counter() - start)
        # One hand-off per event loop, not per image: each wakes that loop from another thread.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Result]] = {}
        for n, item in enumerate(items):
            result = probs if isinstance(probs, BaseException) else probs[n]
            by_loop.setdefault(item.loop, []).append((item.future, result))
        for loop, results in by_loop.items():
            # A closed loop (a forced exit): nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, results)
