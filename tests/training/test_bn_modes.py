"""bench.bn_modes: the four ways of using BatchNorm and dropout at test time, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bn_modes
from training.engine import Precision
from training.model import AlexNet, AlexNetConfig
from training.preprocess import InputTransform
from training.trainer import RunResult


def test_recalibrated_statistics_are_the_images_own_under_the_current_weights() -> None:
    """The running statistics become the average over the images given, not an exponential
    average that keeps some of the old ones."""
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig()).eval()
    bn = bn_modes.batch_norms(model)[0]
    bn.running_mean.fill_(5.0)  # stale statistics, to be replaced whole
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    inputs: list[torch.Tensor] = []
    hook = bn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    bn_modes.recalibrate(model, InputTransform(), images, Precision(None, channels_last=False))
    hook.remove()
    (x,) = inputs  # conv1's output for the 6 images, one batch
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var((0, 2, 3)), rtol=1e-4)
    assert not model.training


@pytest.mark.slow
def test_eval_mode_is_the_runs_own_measure_beside_the_other_modes(
    seed_run: RunResult, image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "modes.json"
    argv = [str(seed_run.last), "--data-dir", str(image_tree), "--device", "cpu"]
    assert bn_modes.main([*argv, "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # The first row measures as training did: the run's own validation split and final test.
    assert rows[0]["test"] == pytest.approx(seed_run.test["accuracy"])
    assert rows[0]["valid"] == pytest.approx(seed_run.metrics[-1]["val_acc"])
    assert len(rows) == 4
    assert capsys.readouterr().out.count("\n| ") == 6  # header, rule and four rows
