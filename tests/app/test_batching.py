"""DynamicBatcher on its own, with a stand-in for the model: which images share a forward pass.

No assertion here is about elapsed time. Where a batch must *not* wait for its delay, the delay
is set far beyond the request's timeout, so waiting would fail the request instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch

from app.batching import DeadlineExceeded, DynamicBatcher, QueueFull
from app.metrics import Metrics

FOREVER = 60.0  # a batch delay no test may wait out (requests time out well before)
TIMEOUT = 20.0


class FakeModel:
    """Answers each image with its own id (the value its pixels hold), recording each batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.fail_next = False
        self.gate: threading.Event | None = None  # when set up, each batch waits on it
        self.entered = threading.Event()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        ids = [int(image[0, 0, 0]) for image in images]
        self.batches.append(ids)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model broke")
        return torch.tensor(ids, dtype=torch.float32)[:, None]


def image(i: int) -> torch.Tensor:
    return torch.full((3, 2, 2), i, dtype=torch.uint8)


def answer(result: list[torch.Tensor]) -> list[int]:
    return [int(r[0]) for r in result]


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def make_batcher(model: FakeModel) -> Iterator[Callable[..., DynamicBatcher]]:
    made: list[DynamicBatcher] = []

    def make(**kwargs: Any) -> DynamicBatcher:
        options = {"max_batch_size": 4, "max_batch_delay_s": FOREVER, "max_queue": 64, **kwargs}
        batcher = DynamicBatcher(model, metrics=Metrics(), **options)
        made.append(batcher)
        return batcher

    yield make
    if model.gate is not None:
        model.gate.set()
    for batcher in made:
        batcher.stop(TIMEOUT)


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


async def enqueue(batcher: DynamicBatcher, *ids: int, timeout: float = TIMEOUT) -> asyncio.Task:
    """Start a request for these images and return once they are on the queue."""
    task = asyncio.ensure_future(batcher.predict([image(i) for i in ids], timeout))
    await asyncio.sleep(0)  # runs predict() up to its first await: the images are queued
    return task


def test_a_batch_closes_when_full(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_batch_size=3)

    async def scenario() -> list[Any]:
        tasks = [await enqueue(batcher, 0, 1, 2, 3, 4), await enqueue(batcher, 5, 6)]
        batcher.start()  # finds 7 images queued
        return list(await asyncio.gather(*tasks))

    first, second = run(scenario)
    assert answer(first) == [0, 1, 2, 3, 4]
    assert answer(second) == [5, 6]
    assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_lone_request_does_not_wait_for_company(
    make_batcher: Callable[..., DynamicBatcher], model
) -> None:
    """Nothing else is announced: the batch runs at once, though its delay is a minute and
    the request's timeout far shorter."""
    batcher = make_batcher(max_batch_size=8)
    batcher.start()

    async def scenario() -> list[int]:
        return answer(await batcher.predict([image(7)], timeout_s=10))

    assert run(scenario) == [7]
    assert model.batches == [[7]]


def test_an_announced_request_joins_the_open_batch(
    make_batcher: Callable[..., DynamicBatcher], model
) -> None:
    batcher = make_batcher(max_batch_size=8)
    batcher.start()

    async def scenario() -> tuple[list[int], list[int]]:
        with batcher.incoming() as late:  # e.g. still uploading or decoding
            early = asyncio.ensure_future(batcher.predict([image(1)], TIMEOUT))
            await asyncio.sleep(0.2)  # the first image waits in an open batch meanwhile
            assert not early.done()
            second = await batcher.predict([image(2), image(3)], TIMEOUT, late)
        return answer(await early), answer(second)

    assert run(scenario) == ([1], [2, 3])
    # One pass, and it closed as soon as nothing more was announced (not after a minute).
    assert model.batches == [[1, 2, 3]]


def test_a_batch_closes_after_its_delay(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    """A request is announced but never arrives: the waiting batch still runs, after the delay."""
    batcher = make_batcher(max_batch_size=8, max_batch_delay_s=0.05)
    batcher.start()

    async def scenario() -> list[int]:
        with batcher.incoming():
            return answer(await batcher.predict([image(4)], timeout_s=TIMEOUT))

    assert run(scenario) == [4]
    assert model.batches == [[4]]


def test_an_announcement_that_fails_stops_holding_the_batch(
    make_batcher: Callable[..., DynamicBatcher], model
) -> None:
    """A request that errors while decoding ends its announcement: batches stop waiting on it."""
    batcher = make_batcher(max_batch_size=8)
    batcher.start()

    async def scenario() -> list[int]:
        with pytest.raises(ValueError), batcher.incoming():
            raise ValueError("not an image")
        return answer(await batcher.predict([image(5)], timeout_s=10))

    assert run(scenario) == [5]


def test_cancelled_requests_are_skipped_and_their_batch_mates_answered(
    make_batcher: Callable[..., DynamicBatcher], model
) -> None:
    batcher = make_batcher(max_batch_size=8)

    async def scenario() -> tuple[list[int], list[int]]:
        a = await enqueue(batcher, 1)
        gone = await enqueue(batcher, 2, 3)  # its client disconnects
        b = await enqueue(batcher, 4)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        batcher.start()
        return answer(await a), answer(await b)

    assert run(scenario) == ([1], [4])
    assert model.batches == [[1, 4]]


def test_expired_requests_are_skipped(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_batch_size=8)

    async def scenario() -> list[int]:
        late = await enqueue(batcher, 1, timeout=0.01)
        on_time = await enqueue(batcher, 2)
        with pytest.raises(DeadlineExceeded):
            await late
        batcher.start()
        return answer(await on_time)

    assert run(scenario) == [2]
    assert model.batches == [[2]]


def test_a_model_error_reaches_every_request_of_its_batch(
    make_batcher: Callable[..., DynamicBatcher], model
) -> None:
    batcher = make_batcher(max_batch_size=8)
    model.fail_next = True

    async def scenario() -> tuple[list[BaseException | Any], list[int]]:
        tasks = [await enqueue(batcher, 1), await enqueue(batcher, 2, 3), await enqueue(batcher, 4)]
        batcher.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        after = answer(await batcher.predict([image(5)], TIMEOUT))  # the next batch works
        return results, after

    results, after = run(scenario)
    assert all(isinstance(r, RuntimeError) and "the model broke" in str(r) for r in results)
    assert model.batches == [[1, 2, 3, 4], [5]]
    assert after == [5]


def test_a_full_queue_is_refused(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_queue=3)

    async def scenario() -> None:
        first = await enqueue(batcher, 1, 2)
        with pytest.raises(QueueFull, match="2 images are already waiting"):
            await batcher.predict([image(3), image(4)], TIMEOUT)
        second = await enqueue(batcher, 3)  # still fits
        assert batcher._metrics.registry.get_sample_value("inference_queue_depth") == 3
        batcher.start()
        assert answer(await first) == [1, 2]
        assert answer(await second) == [3]

    run(scenario)
    assert model.batches == [[1, 2, 3]]
    assert batcher._metrics.registry.get_sample_value("inference_queue_depth") == 0


def test_stop_answers_everything_queued(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_batch_size=2)
    model.gate = threading.Event()
    batcher.start()

    async def scenario() -> list[list[int]]:
        running = await enqueue(batcher, 1)
        await asyncio.to_thread(model.entered.wait, TIMEOUT)  # in the model, held
        stopper = threading.Thread(target=batcher.stop, args=(TIMEOUT,))
        stopper.start()  # queues the stop marker, then waits for the thread
        await asyncio.to_thread(lambda: _wait_until(lambda: batcher._queue.qsize() == 1))
        queued = [await enqueue(batcher, 2, 3), await enqueue(batcher, 4)]  # behind the marker
        model.gate.set()
        results = [answer(r) for r in await asyncio.gather(running, *queued)]
        await asyncio.to_thread(stopper.join, TIMEOUT)
        assert not stopper.is_alive()
        return results

    assert run(scenario) == [[1], [2, 3], [4]]
    assert model.batches == [[1], [2, 3], [4]]  # drained in batches of at most 2
    assert batcher._thread is not None and not batcher._thread.is_alive()


def test_stop_finishes_the_open_batch(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_batch_size=8)
    batcher.start()

    async def scenario() -> list[int]:
        with batcher.incoming():  # holds the batch open (for up to a minute)
            task = asyncio.ensure_future(batcher.predict([image(6)], TIMEOUT))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(batcher.stop, TIMEOUT)
            return answer(await task)

    assert run(scenario) == [6]
    assert model.batches == [[6]]
    assert batcher._thread is not None and not batcher._thread.is_alive()


def test_metrics_record_batch_sizes(make_batcher: Callable[..., DynamicBatcher], model) -> None:
    batcher = make_batcher(max_batch_size=2)

    async def scenario() -> None:
        task = await enqueue(batcher, 1, 2, 3)
        batcher.start()
        await task

    run(scenario)
    registry = batcher._metrics.registry
    assert registry.get_sample_value("inference_batch_size_count") == 2
    assert registry.get_sample_value("inference_batch_size_sum") == 3
    assert registry.get_sample_value("inference_batch_size_bucket", {"le": "1.0"}) == 1
    assert registry.get_sample_value("inference_batch_seconds_count") == 2


def _wait_until(condition: Callable[[], bool]) -> None:
    pause = threading.Event()
    for _ in range(int(TIMEOUT / 0.01)):
        if condition():
            return
        pause.wait(0.01)
    raise AssertionError("condition not reached")
