"""The training step's CUDA-graph bookkeeping, checked on a CPU.

Every single-GPU run captures its step as a CUDA graph. Capture needs warm-up steps that change
the weights, BatchNorm statistics and momentum; `TrainStep.capture_graph` must put them all back,
or training silently starts from another state. Here torch.cuda's stream and graph calls are
replaced by stand-ins that run the step eagerly (a CPU has no graphs), so the restore and what a
replay then computes can be compared with plain eager steps, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from training.data import Split
from training.engine import Precision, TrainStep
from training.preprocess import InputTransform, Preprocessing

FP32 = Precision(amp_dtype=None, channels_last=False)


class _Stream:
    def wait_stream(self, other: Any) -> None:
        pass


class _Graph:
    """Replays whatever the test tells it to: the step that was captured."""

    def replay(self) -> None:
        raise AssertionError("set by the test")


@contextlib.contextmanager
def _capture(graph: _Graph) -> Iterator[None]:
    yield  # the step inside runs eagerly, as warm-up steps do; capture_graph must undo it


@pytest.fixture
def cpu_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", _capture)


def _model() -> nn.Module:
    """Small, with what matters here: BatchNorm buffers and dropout's randomness."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 15 * 15, 3),
    )  # fmt: skip


def _step(model: nn.Module, lr: float | torch.Tensor, early: bool = False) -> TrainStep:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    train = Split(images, torch.randint(0, 3, (16,), generator=generator))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    transform = InputTransform(Preprocessing(input_size=32))
    return TrainStep(
        model, transform, optimizer, train, local_batch_size=4, label_smoothing=0.1,
        augment="crop-flip", crop_padding=4, precision=FP32,
        early_sgd=list(model[-1].parameters()) if early else None,
    )  # fmt: skip


def _state(step: TrainStep) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in step.model.state_dict().items()}
    for n, p in enumerate(step.optimizer.param_groups[0]["params"]):
        buffer = step.optimizer.state.get(p, {}).get("momentum_buffer")
        state[f"momentum.{n}"] = buffer.clone() if buffer is not None else torch.zeros_like(p)
    return state


def test_capture_puts_weights_statistics_and_momentum_back(cpu_graphs: None) -> None:
    step = _step(_model(), lr=0.1)
    before = _state(step)
    step.capture_graph(step.model)
    after = _state(step)
    assert isinstance(step.graph, _Graph)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not restored after capture: {changed}"
    assert (step.steps, step.loss_sum.item(), step.correct.item()) == (0, 0.0, 0)


def test_replaying_the_captured_step_trains_as_eager_steps_do(cpu_graphs: None) -> None:
    """What the graph then does (with its learning rate a tensor, as graphs need) equals what
    eager steps from the same starting state do, with a float learning rate."""
    graphed = _step(_model(), lr=torch.tensor(0.1))
    eager = _step(copy.deepcopy(graphed.model), lr=0.1)
    graphed.capture_graph(graphed.model)
    graphed.graph.replay = graphed._step  # type: ignore[union-attr, method-assign]
    results = []
    for step in (graphed, eager):
        torch.manual_seed(7)  # the same crops, flips and dropout for both
        for i in range(3):
            step(torch.arange(4 * i, 4 * i + 4))
        results.append(_state(step))
    assert graphed.steps == eager.steps == 3
    different = [k for k in results[1] if not torch.equal(results[0][k], results[1][k])]
    assert not different, f"graph replays and eager steps differ: {different}"


def test_the_schedule_moves_the_learning_rate_tensor_in_place() -> None:
    """A graph reads the learning rate from the tensor it captured: the scheduler must update
    that tensor, not replace it."""
    step = _step(_model(), lr=torch.tensor(0.1))
    group = step.optimizer.param_groups[0]
    captured = group["lr"]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        step.optimizer, max_lr=0.1, total_steps=10, pct_start=0.5, cycle_momentum=False
    )
    values = [captured.item()]
    for _ in range(3):
        step.optimizer.step()
        scheduler.step()
        assert group["lr"] is captured
        values.append(captured.item())
    assert values == sorted(values) and len(set(values)) == 4  # rising through the warm-up


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_early_sgd_trains_exactly_as_the_optimizers_step(
    graphs: bool, request: pytest.FixtureRequest
) -> None:
    """--early-sgd updates the head during the backward pass (with SGD's own arithmetic, its
    weight decay, Nesterov momentum and the first step's new buffers): the same weights and
    momentum, bit for bit, as the optimizer's step after it; through a captured graph too."""
    if graphs:
        request.getfixturevalue("cpu_graphs")
    lr = torch.tensor(0.1) if graphs else 0.1
    plain = _step(_model(), lr=lr)
    early = _step(copy.deepcopy(plain.model), lr=lr, early=True)
    seen: list[int] = []
    for p in early.model[-1].parameters():  # the updates happen inside backward
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.ndim))
    results = []
    for step in (plain, early):
        if graphs:
            step.capture_graph(step.model)
            step.graph.replay = step._step  # type: ignore[union-attr, method-assign]
        torch.manual_seed(7)
        for i in range(3):
            step(torch.arange(4 * i, 4 * i + 4))
        results.append(_state(step))
    assert seen and all(p.grad is not None for p in early.model.parameters())
    different = [k for k in results[0] if not torch.equal(results[0][k], results[1][k])]
    assert not different, f"early SGD and the optimizer's step differ: {different}"
    moved = [
        k for k in results[0] if not torch.equal(results[0][k], _state(_step(_model(), lr))[k])
    ]
    assert "5.weight" in moved and "momentum.5" in moved  # the head did train


def test_a_closed_early_sgd_step_leaves_the_model_to_other_training() -> None:
    """Its hooks go with `close` (the trainer closes its step however a run ends): a later
    backward on the model, e.g. a user's own fine-tuning loop, updates nothing by itself."""
    step = _step(_model(), lr=0.1, early=True)
    step(torch.arange(4))
    step.close()
    head = {k: v.clone() for k, v in step.model[-1].state_dict().items()}
    step.model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(v, step.model[-1].state_dict()[k]) for k, v in head.items())
    assert step.model[-1].weight.grad is not None  # the backward did reach the head
