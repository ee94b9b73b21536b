"""The GPU warm-up that overlaps the decoding: what it runs, and what it leaves alone (a whole
run with it is in test_trainer.py)."""

from __future__ import annotations

import torch

from training.engine import Precision
from training.model import AlexNetConfig
from training.preprocess import Preprocessing
from training.warmup import warm_up


def test_warm_up_runs_the_step_and_an_evaluation_and_leaves_the_rngs_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected_next = torch.rand(3)
    torch.set_rng_state(before)
    convs: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        convs.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: record(m, a) if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3 else None
    )
    try:
        warm_up(
            torch.device("cpu"),
            batch_size=2,
            eval_batch_size=3,
            precision=Precision(torch.bfloat16, channels_last=True),
            model_config=AlexNetConfig(dropout=0.5),
            augment="crop-flip",
            crop_padding=4,
            prep=Preprocessing(),
        )
    finally:
        handle.remove()
    # Two training steps at the training batch size, then one evaluation batch, at 227x227.
    assert convs == [(2, 3, 227, 227), (2, 3, 227, 227), (3, 3, 227, 227)]
    assert torch.equal(torch.rand(3), expected_next)  # dropout and crop-flip drew elsewhere
