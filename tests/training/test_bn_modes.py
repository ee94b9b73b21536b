"""bench.bn_modes: the four ways of using BatchNorm and dropout at test time, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bn_modes
from tests.helpers import assert_a_cut_short_report_keeps_the_last
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
    report = json.loads(out.read_text())
    rows = report["rows"]
    # What the printed table heads itself with is in the JSON too (it had only the device).
    checkpoint = torch.load(seed_run.last, map_location="cpu", weights_only=False)
    assert report["checkpoint"] == str(seed_run.last)
    assert (report["epoch"], report["recipe"]) == (checkpoint["epoch"], checkpoint["recipe"])
    assert report["device"] == "CPU"
    # The first row measures as training did: the run's own validation split and final test.
    assert rows[0]["test"] == pytest.approx(seed_run.test["accuracy"])
    assert rows[0]["valid"] == pytest.approx(seed_run.metrics[-1]["val_acc"])
    assert len(rows) == 4
    assert capsys.readouterr().out.count("\n| ") == 6  # header, rule and four rows


class OtherDevice(torch.Tensor):
    """Labels as `main` leaves them on a GPU run: on another device than the CPU. Comparing
    them with a CPU tensor fails as CUDA's do; `.cpu()` brings them back. (The tests have no
    GPU: this stands in for one where the split's labels live.)"""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in (torch.Tensor.cpu,):
            return args[0].as_subclass(torch.Tensor).clone()
        if func in (torch.eq, torch.Tensor.eq, torch.Tensor.__eq__, torch.Tensor.__ne__):
            devices = {type(a) is cls for a in args if isinstance(a, torch.Tensor)}
            if devices == {True, False}:
                raise RuntimeError("Expected all tensors to be on the same device")
        return super().__torch_function__(func, types, args, kwargs)


def test_accuracy_compares_predictions_and_labels_on_one_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA, main moves the split (labels included) to the GPU while the predictions were
    moved to the CPU: "Expected all tensors to be on the same device", in the one unattended
    GPU run. The labels now come to the CPU once, wherever the split lives."""
    # Logits that predict each image's first pixel value: 3 of the 4 labels below are right.
    monkeypatch.setattr(
        bn_modes,
        "forward_logits",
        lambda model, transform, images, precision: torch.nn.functional.one_hot(
            images[:, 0, 0, 0].long(), 10
        ).float(),
    )
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 0]).as_subclass(OtherDevice)
    split = bn_modes.Split(images, labels)
    acc = bn_modes.accuracy(
        torch.nn.Identity(), InputTransform(), split, Precision(None, False), batch=3
    )
    assert acc == pytest.approx(75.0)


@pytest.mark.slow
def test_a_json_write_cut_short_leaves_the_previous_report(
    seed_run: RunResult, image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json-out was written in place: a kill or a full disk mid-write left half a report."""
    out = tmp_path / "modes.json"
    argv = [str(seed_run.last), "--data-dir", str(image_tree), "--device", "cpu"]
    assert_a_cut_short_report_keeps_the_last(
        out, monkeypatch, lambda: bn_modes.main([*argv, "--json-out", str(out)])
    )
