"""Whole training runs on a CPU: what a run writes, and that resuming is exact."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
from PIL import Image

import training.trainer as trainer_module
from tests.helpers import folder_locked_by_another_process, make_image_tree, tiny_config
from training.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    build_model,
    load_checkpoint,
    save_atomic,
)
from training.data import load_data
from training.engine import Precision, accuracy_report, predict
from training.errors import UserError
from training.model import AlexNet, AlexNetConfig
from training.preprocess import InputTransform, Preprocessing
from training.recipes import TrainConfig
from training.runtime import Distributed
from training.trainer import RunResult, TrainHooks, _precision, _use_graphs, train

pytestmark = pytest.mark.slow

CLASSES = ["blue", "green", "red"]
FP32 = Precision(amp_dtype=None, channels_last=False)
# 2 of the 4 steps rising: OneCycleLR cannot warm up over a single step (see the test below).
FAST_WARMUP = 0.5


# ---- what a run writes ------------------------------------------------------------------------


def test_run_writes_loadable_checkpoints(seed_run: RunResult, image_tree: Path) -> None:
    out = seed_run.out_dir
    assert seed_run.last == out / "last.pt" and seed_run.best == out / "best.pt"
    last_raw = torch.load(seed_run.last, weights_only=True)  # plain data only
    best_raw = torch.load(seed_run.best, weights_only=True)
    last, best = load_checkpoint(seed_run.last), load_checkpoint(seed_run.best)
    assert last["epoch"] == 2 and last["step"] == 4
    assert last_raw.keys() == last.keys()

    for ckpt in (last, best):
        assert ckpt["kind"] == "training"
        assert ckpt["classes"] == CLASSES
        assert Preprocessing.from_dict(ckpt["preprocessing"]) == Preprocessing()
        assert ckpt["recipe"] == "seed"
        config = ckpt["config"]
        assert (config["recipe"], config["epochs"], config["batch_size"]) == ("seed", 2, 8)
        assert (config["lr"], config["momentum"], config["weight_decay"]) == (0.005, 0.9, 0.005)
        assert config["data_dir"] == str(image_tree) and config["out_dir"] == str(out)
        assert [m["epoch"] for m in ckpt["metrics"]] == list(range(1, ckpt["epoch"] + 1))
        assert set(ckpt["versions"]) >= {"python", "torch", "torchvision", "numpy", "pillow"}
        assert ckpt["versions"]["torch"] == str(torch.__version__)
        assert ckpt["data"] == {
            "source": ckpt["data"]["source"],
            "train": 18,
            "valid": 6,
            "test": 6,
        }
        assert ckpt["world_size"] == 1
        assert ckpt["model"]["args"] == {"num_classes": 3, "dropout": 0.5}
        assert 0 <= ckpt["test"]["accuracy"] <= 100 and ckpt["test"]["images"] == 6
        assert sum(map(sum, ckpt["test"]["confusion"])) == 6

    assert len(last["metrics"]) == 2
    for m in last["metrics"]:
        assert {"train_loss", "train_acc", "val_acc", "lr", "images_per_s", "elapsed_s"} <= set(m)
        assert m["train_loss"] > 0 and m["lr"] == 0.005
    assert best["epoch"] == last["best"]["epoch"]
    assert best["metrics"][-1]["val_acc"] == last["best"]["val_acc"]
    assert last["test"] == seed_run.test and best["test"] == seed_run.best_test

    # Optimizer state in last.pt only (best.pt is weights for serving).
    assert "optimizer" in last and "optimizer" not in best and "optimizer" not in best_raw
    momentum = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert len(momentum) == len(last["model"]["state_dict"]) - 3 * 5  # minus BN buffers
    assert all(buf.abs().sum() > 0 for buf in momentum)
    assert last["scheduler"] is None  # constant learning rate

    # The weights moved away from the initialization.
    torch.manual_seed(0)
    initial = AlexNet(AlexNetConfig(num_classes=3)).state_dict()
    assert not torch.equal(
        initial["layer1.0.weight"], last["model"]["state_dict"]["layer1.0.weight"]
    )


def test_run_writes_reports(seed_run: RunResult) -> None:
    out = seed_run.out_dir
    last = load_checkpoint(seed_run.last)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == last["metrics"]
    # The times of an epoch add up: training, then validation, within the epoch, within the run.
    for m in last["metrics"]:
        assert m["train_s"] > 0 and m["val_s"] > 0 and m["train_s"] + m["val_s"] <= m["epoch_s"]
        assert m["images_per_s"] == pytest.approx(2 * 8 / m["train_s"])  # 2 steps of 8
    elapsed = [m["elapsed_s"] for m in last["metrics"]]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= seed_run.train_seconds
    for name in ("curves.png", "confusion.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"] == last["test"] and summary["world_size"] == 1
    # Nothing half-written is left behind.
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


class StopAtFirstStep(Exception):
    """Ends a run once the start line is logged: nothing after it is under test."""


@pytest.mark.parametrize(
    ("epochs", "batch_size", "expected"),
    [(1, 16, ": 1 epoch of 1 step, batch 16,"), (2, 8, ": 2 epochs of 2 steps, batch 8,")],
)
def test_the_start_line_says_epoch_and_step_in_the_singular_for_one(
    image_tree: Path,
    run_dir: Path,
    caplog: pytest.LogCaptureFixture,
    epochs: int,
    batch_size: int,
    expected: str,
) -> None:
    # 18 training images: a batch of 16 makes 1 step, a batch of 8 makes 2.
    config = tiny_config("seed", image_tree, run_dir, epochs=epochs, batch_size=batch_size)

    def stop(epoch: int, step: int) -> None:
        raise StopAtFirstStep

    with caplog.at_level(logging.INFO, logger="training.trainer"), pytest.raises(StopAtFirstStep):
        train(config, hooks=TrainHooks(on_step=stop))
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert len(start) == 1 and expected in start[0], start


def test_build_model_reproduces_the_trained_model(seed_run: RunResult, image_tree: Path) -> None:
    data = load_data(image_tree, image_tree, valid_size=0.25, split_seed=1)
    transform = InputTransform()
    for path, test_key in ((seed_run.last, "test"), (seed_run.best, "test")):
        ckpt = load_checkpoint(path)
        model = build_model(ckpt)
        model.eval()
        test = accuracy_report(
            data.test.labels,
            predict(model, transform, data.test.images, batch_size=16, precision=FP32),
            data.classes,
        )
        # The same predictions as the run made with its own model, image for image.
        assert test["confusion"] == ckpt[test_key]["confusion"]
        assert test["accuracy"] == ckpt[test_key]["accuracy"]
        valid = predict(model, transform, data.valid.images, batch_size=16, precision=FP32)
        val_acc = float((valid == data.valid.labels).sum()) / len(valid) * 100
        assert val_acc == ckpt["metrics"][ckpt["epoch"] - 1]["val_acc"]


# ---- resume -----------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    return {
        "weights": ckpt["model"]["state_dict"],
        "optimizer": ckpt["optimizer"],
        "scheduler": ckpt["scheduler"],
        "metrics": ckpt["metrics"],
        "test": ckpt["test"],
        "best": ckpt["best"],
    }


@pytest.fixture(scope="module")
def uninterrupted(
    image_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Run A: the fast recipe (one-cycle schedule, crop-flip, label smoothing, Nesterov), 2 epochs
    of 2 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("run-a")
    train(tiny_config("fast", image_tree, out, warmup=FAST_WARMUP))
    state = _load_state(out / "last.pt")
    best = load_checkpoint(out / "best.pt")
    state["best_pt"] = {"epoch": best["epoch"], "weights": best["model"]["state_dict"]}
    state["summary"] = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    yield state


def _assert_same_run(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    weights, expected = resumed["weights"], reference["weights"]
    assert weights.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, f"weights differ after resume: {different}"
    for key, state in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"],
                           state["momentum_buffer"])  # fmt: skip
    assert resumed["optimizer"]["param_groups"] == reference["optimizer"]["param_groups"]
    assert resumed["scheduler"] == reference["scheduler"]
    # The one-cycle schedule moved on through epoch 2 (the state the resume had to restore).
    assert resumed["scheduler"]["total_steps"] == 4
    assert resumed["scheduler"]["last_epoch"] >= 3
    for got, want in zip(resumed["metrics"], reference["metrics"], strict=True):
        for key in ("epoch", "train_loss", "train_acc", "val_acc", "lr"):
            assert got[key] == want[key], key
    assert resumed["test"] == reference["test"]
    assert resumed["best"] == reference["best"]


class Interrupt:
    """Hooks that press Ctrl-C at one point of the run."""

    def __init__(self, epoch: int, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_step(self, epoch: int, step: int) -> None:
        if (epoch, step) == (self.epoch, self.step):
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.step is None and epoch == self.epoch:
            raise KeyboardInterrupt

    def hooks(self) -> TrainHooks:
        return TrainHooks(on_step=self.on_step, on_epoch_end=self.on_epoch_end)


def test_early_sgd_trains_the_same_run(
    uninterrupted: dict[str, Any], image_tree: Path, run_dir: Path
) -> None:
    """--early-sgd changes when the head is updated, not what it becomes. Started with it and
    resumed without it (a setting a resume may change), the run is the uninterrupted one."""
    config = tiny_config("fast", image_tree, run_dir, warmup=FAST_WARMUP, early_sgd=True)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1).hooks())
    assert load_checkpoint(run_dir / "last.pt")["config"]["early_sgd"] is True
    train(replace(config, early_sgd=False), resume=run_dir / "last.pt", explicit={"early_sgd"})
    _assert_same_run(_load_state(run_dir / "last.pt"), uninterrupted)


def test_early_sgd_is_refused_under_torchrun(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its updates would start before DDP has averaged the gradients."""
    monkeypatch.setattr(
        trainer_module,
        "init_distributed",
        lambda device: (Distributed(rank=0, world_size=2), torch.device("cpu")),
    )
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", lambda box, src: None)
    with pytest.raises(UserError, match=r"^--early-sgd is for one process; drop it under torchrun"):
        train(tiny_config("seed", image_tree, run_dir, epochs=1, early_sgd=True))


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_only_rank_0_warns_of_a_resume_fault(
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    rank: int,
) -> None:
    """Every rank logs warnings: each printed the same resume warning, once per process."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=3)
    (run_dir / "best.pt").unlink()  # its epoch is last.pt's: rebuilt, with a warning
    monkeypatch.setattr(
        trainer_module,
        "init_distributed",
        lambda device: (Distributed(rank=rank, world_size=2), torch.device("cpu")),
    )
    verdicts: list[list[object]] = []  # rank 0's verdict, as the other ranks get it
    monkeypatch.setattr(
        trainer_module.dist, "broadcast_object_list", lambda box, src: verdicts.append(box)
    )
    caplog.set_level(logging.WARNING, logger="training")
    # --early-sgd is refused under torchrun, once the checkpoint is read: the run stops there.
    with pytest.raises(UserError, match=r"^--early-sgd is for one process"):
        train(replace(config, early_sgd=True), resume=run_dir / "last.pt", explicit={"early_sgd"})
    rebuilding = [r for r in caplog.records if "rebuilding it from them" in r.getMessage()]
    assert len(rebuilding) == (1 if rank == 0 else 0)
    assert verdicts == [[None]]  # the folder is free: checked once, before the files are read


def stopped_after_epoch_1(image_tree: Path, run_dir: Path, epochs: int) -> TrainConfig:
    """A `seed` run of `epochs` epochs in `run_dir`, stopped by Ctrl-C after its first; its
    configuration, to resume it with."""
    config = tiny_config("seed", image_tree, run_dir, epochs=epochs)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1).hooks())
    return config


def stopped_after_epoch_2_best_1(image_tree: Path, run_dir: Path, epochs: int) -> TrainConfig:
    """A `seed` run stopped after its second epoch, whose last.pt records the first as the best
    (tiny runs do not choose): best.pt's weights are then not last.pt's."""
    config = tiny_config("seed", image_tree, run_dir, epochs=epochs)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=2).hooks())
    last = load_checkpoint(run_dir / "last.pt")
    last["best"] = {"epoch": 1, "val_acc": last["metrics"][0]["val_acc"]}
    save_atomic(last, run_dir / "last.pt")
    return config


@pytest.mark.parametrize(
    "interrupt",
    [Interrupt(epoch=1), Interrupt(epoch=2, step=1)],
    ids=["after-epoch-1", "mid-epoch-2"],
)
def test_resume_after_interruption_is_exact(
    interrupt: Interrupt,
    uninterrupted: dict[str, Any],
    image_tree: Path,
    run_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tiny_config("fast", image_tree, run_dir, warmup=FAST_WARMUP)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(config, hooks=interrupt.hooks())
    assert f"--resume {run_dir / 'last.pt'}" in caplog.text
    stopped = load_checkpoint(run_dir / "last.pt")
    assert stopped["epoch"] == 1 and len(stopped["metrics"]) == 1  # the last completed epoch
    assert stopped["test"] is None
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1
    assert not (run_dir / "summary.json").exists()

    result = train(config, resume=run_dir / "last.pt")
    assert result.out_dir == run_dir
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    _assert_same_run(_load_state(run_dir / "last.pt"), uninterrupted)
    # best.pt, what a user would export, is the uninterrupted run's too (whether its epoch was
    # before the interruption, read back from disk, or after it).
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == uninterrupted["best_pt"]["epoch"]
    expected = uninterrupted["best_pt"]["weights"]
    assert all(torch.equal(best["model"]["state_dict"][k], v) for k, v in expected.items())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["resumed_from_epoch"] == 1 and uninterrupted["summary"]["resumed_from_epoch"] == 0
    )
    for key in ("test", "best", "epochs"):
        assert summary[key] == uninterrupted["summary"][key], key
    assert result.best_test == summary["best"]["test"]

    # A finished run cannot be resumed again, and best.pt is not a training state.
    with pytest.raises(UserError, match="already finished all 2 epochs"):
        train(config, resume=run_dir / "last.pt")
    with pytest.raises(CheckpointError, match=r"resume from last\.pt"):
        train(config, resume=run_dir / "best.pt")


def test_a_stop_during_the_final_evaluation_keeps_the_checkpoints_and_resumes(
    uninterrupted: dict[str, Any],
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C after the last epoch, while the test set is evaluated: the queued checkpoints
    still reach the disk (they used to be lost, with the process aborting), and resuming runs
    just the final evaluation, ending as the uninterrupted run does."""

    real_evaluate, calls = trainer_module.evaluate, []

    def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 3:  # after 2 epochs' validation: the test set
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    config = tiny_config("fast", image_tree, run_dir, warmup=FAST_WARMUP)
    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    assert f"--resume {run_dir / 'last.pt'}" in caplog.text
    stopped = load_checkpoint(run_dir / "last.pt")
    assert stopped["epoch"] == 2 and stopped["test"] is None
    assert load_checkpoint(run_dir / "best.pt")["kind"] == "training"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    train(config, resume=run_dir / "last.pt")
    _assert_same_run(_load_state(run_dir / "last.pt"), uninterrupted)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_epoch"] == 2


def test_a_stop_while_the_final_last_pt_is_written_says_the_run_is_complete(
    uninterrupted: dict[str, Any],
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C once the final last.pt is queued: it still reaches the disk, so the hint to
    resume (which would only answer "already finished") gives way to saying it is complete."""

    class StoppedOnce(CheckpointWriter):
        closes = 0

        def close(self) -> None:
            StoppedOnce.closes += 1
            if StoppedOnce.closes == 1:  # the first close is the run's own, after the final submit
                raise KeyboardInterrupt
            super().close()

    monkeypatch.setattr(trainer_module, "CheckpointWriter", StoppedOnce)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(tiny_config("fast", image_tree, run_dir, warmup=FAST_WARMUP))
    assert f"stopped as the run ended; its files in {run_dir} are complete" in caplog.text
    assert "--resume" not in caplog.text
    assert load_checkpoint(run_dir / "last.pt")["test"] == uninterrupted["test"]


def test_a_run_with_a_relative_data_dir_resumes_from_any_folder(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped run prints `--resume <absolute path>/last.pt`; run from another folder, that
    looked for a relative --data-dir there and stopped with '--data-dir cifar10 is not a
    directory', a flag the user had not passed. The checkpoint keeps the folder absolute."""
    monkeypatch.chdir(image_tree.parent)
    config = tiny_config("seed", Path(image_tree.name), run_dir, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1).hooks())
    assert Path(load_checkpoint(run_dir / "last.pt")["config"]["data_dir"]).is_absolute()
    monkeypatch.chdir(run_dir)
    result = train(config, resume=run_dir / "last.pt")
    assert load_checkpoint(result.last)["epoch"] == 2 and result.test["accuracy"] >= 0


def test_the_resume_hint_of_a_run_in_a_relative_folder_is_absolute(
    image_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The default folder is runs/<recipe>-<time>, relative: the hint worked only from here."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config("seed", image_tree, Path("runs/relative"), epochs=2)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1).hooks())
    assert f"--resume {tmp_path / 'runs' / 'relative' / 'last.pt'}" in caplog.text


def test_resume_without_the_runs_best_pt_stops_before_training(
    image_tree: Path, run_dir: Path
) -> None:
    config = stopped_after_epoch_2_best_1(image_tree, run_dir, epochs=3)
    moved = run_dir / "moved"
    moved.mkdir()
    shutil.copy(run_dir / "last.pt", moved / "last.pt")  # without best.pt
    before = (moved / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"best\.pt is missing.*\(epoch 1\).*put it back"):
        train(config, resume=moved / "last.pt")
    assert (moved / "last.pt").read_bytes() == before and sorted(os.listdir(moved)) == ["last.pt"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_lost_best_pt_is_named_and_restart_best_resumes_the_run(
    damage: str, image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A healthy last.pt beside a best.pt that is gone or unreadable (a disk error, a partial
    copy): the resume was refused with no way on but starting over, losing every epoch.
    --restart-best continues; best.pt then holds the best of the epochs from last.pt's on,
    starting with last.pt's own weights, and the record says since when."""
    config = stopped_after_epoch_2_best_1(image_tree, run_dir, epochs=3)
    last_bytes = (run_dir / "last.pt").read_bytes()
    resumed = load_checkpoint(run_dir / "last.pt")["model"]["state_dict"]
    if damage == "missing":
        (run_dir / "best.pt").unlink()
    else:
        (run_dir / "best.pt").write_bytes((run_dir / "best.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match=r"(missing|not a readable checkpoint).*--restart-best"):
        train(config, resume=run_dir / "last.pt")
    assert (run_dir / "last.pt").read_bytes() == last_bytes
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        result = train(config, resume=run_dir / "last.pt", restart_best=True)
    assert "weights of epoch 1 are lost; best.pt will hold the best of epochs 2-3" in caplog.text
    best = load_checkpoint(run_dir / "best.pt")
    assert best["best"]["since_epoch"] == 2 and best["best"]["epoch"] in (2, 3)
    assert result.best_test == json.loads((run_dir / "summary.json").read_text())["best"]["test"]
    if best["best"]["epoch"] == 2:  # nothing later beat it: the weights are last.pt's of epoch 2
        for name, tensor in best["model"]["state_dict"].items():
            assert torch.equal(tensor, resumed[name]), name


@pytest.mark.parametrize("restart_best", [False, True], ids=["plain", "restart-best"])
def test_a_lost_best_pt_whose_weights_last_pt_holds_is_rebuilt(
    restart_best: bool, image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The best epoch was last.pt's own: nothing is lost, so the resume needs no flag (it was
    refused), and the best record stays the run's (--restart-best used to say the weights
    were lost and drop the epochs before)."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=2)
    stopped = load_checkpoint(run_dir / "last.pt")
    (run_dir / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        train(config, resume=run_dir / "last.pt", restart_best=restart_best)
    assert "best.pt is missing; it held the weights of epoch 1, which last.pt holds" in caplog.text
    assert "are lost" not in caplog.text
    best = load_checkpoint(run_dir / "best.pt")
    assert "since_epoch" not in best["best"]
    if best["epoch"] == 1:  # epoch 2 did not beat it: the weights and record are last.pt's
        assert best["best"] == stopped["best"]
        for name, tensor in best["model"]["state_dict"].items():
            assert torch.equal(tensor, stopped["model"]["state_dict"][name]), name
    else:
        assert best["best"]["epoch"] == 2


def test_restart_best_leaves_a_good_best_pt_alone(image_tree: Path, run_dir: Path) -> None:
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=2)
    before = (run_dir / "best.pt").read_bytes()
    with pytest.raises(UserError, match=r"best\.pt is fine; resume without --restart-best"):
        train(config, resume=run_dir / "last.pt", restart_best=True)
    assert (run_dir / "best.pt").read_bytes() == before


def test_an_out_dir_that_cannot_hold_the_run_is_refused_before_training(
    image_tree: Path, run_dir: Path
) -> None:
    a_file = run_dir / "a-file"
    a_file.write_text("not a folder")
    for out, message in (
        (a_file, r"--out-dir .*a-file is a file; choose a folder"),
        (a_file / "sub", r"cannot write to .*choose another --out-dir"),
    ):
        with pytest.raises(UserError, match=message):
            train(tiny_config("seed", image_tree, out))
    # A folder with another run's files but no last.pt (deleted to save space) is not reused.
    used = run_dir / "used"
    used.mkdir()
    (used / "best.pt").write_bytes(b"an earlier run's weights")
    with pytest.raises(UserError, match=r"already holds files of another run \(best\.pt\)"):
        train(tiny_config("seed", image_tree, used))
    assert (used / "best.pt").read_bytes() == b"an earlier run's weights"
    # What a process killed during its first checkpoint write leaves: named, hidden or not.
    (used / "best.pt").unlink()
    (used / ".last.pt.4242.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(UserError, match=r"another run \(\.last\.pt\.4242\.tmp\); .* remove them"):
        train(tiny_config("seed", image_tree, used))


def test_best_pt_is_written_before_last_pt_and_the_final_last_pt_goes_last(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.pt records the best epoch and, at the end, the test result: written after best.pt
    (and after the reports), a run stopped between two writes resumes consistently."""
    from training import checkpoint

    order: list[tuple[str, int, bool]] = []
    submit = checkpoint.CheckpointWriter.submit

    def recording(self: Any, obj: dict[str, Any], path: Path, *args: Any) -> None:
        order.append((path.name, obj["epoch"], obj["test"] is not None))
        assert path.name != "last.pt" or obj["best"]["epoch"] <= obj["epoch"]
        if path.name == "last.pt" and obj["test"] is not None:  # the reports are already written
            assert (run_dir / "summary.json").exists() and (run_dir / "curves.png").exists()
        submit(self, obj, path, *args)

    monkeypatch.setattr(checkpoint.CheckpointWriter, "submit", recording)
    train(tiny_config("seed", image_tree, run_dir, epochs=2))
    assert order[0] == ("best.pt", 1, False) and order[1] == ("last.pt", 1, False)
    assert order[-2][0] == "best.pt" and order[-1] == ("last.pt", 2, True)
    for k, (name, epoch, _) in enumerate(order[:-2]):
        if name == "best.pt":  # every best.pt of an epoch comes just before that epoch's last.pt
            assert order[k + 1][:2] == ("last.pt", epoch)


def test_metrics_jsonl_never_shows_an_epoch_that_last_pt_does_not_hold(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up as epoch 2's last.pt is written: the run stops, and metrics.jsonl
    ends at epoch 1 with last.pt. It was written beside the background write, so it showed
    epoch 2, which a resume trains again."""
    from training import checkpoint

    real_save = checkpoint.save_atomic

    def disk_full_at_epoch_2(obj: dict[str, Any], path: Path) -> None:
        if path.name == "last.pt" and obj["epoch"] == 2:
            raise CheckpointError(f"cannot write {path}: No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", disk_full_at_epoch_2)
    with pytest.raises(CheckpointError, match="No space left"):
        train(tiny_config("seed", image_tree, run_dir, epochs=3))
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


def test_a_resume_brings_metrics_jsonl_up_to_last_pt(image_tree: Path, run_dir: Path) -> None:
    """A run killed between its final epoch's last.pt and metrics.jsonl (which follows it):
    the resume only tests and reports, and it left the file without that epoch."""
    config = tiny_config("seed", image_tree, run_dir, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=2).hooks())
    metrics_file = run_dir / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines()
    assert len(lines) == 2 and load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    metrics_file.write_text(lines[0] + "\n")  # where a SIGKILL between the writes leaves it
    train(config, resume=run_dir / "last.pt")
    assert [json.loads(line)["epoch"] for line in metrics_file.read_text().splitlines()] == [1, 2]


def test_resume_keeps_the_best_record_to_what_best_pt_holds(
    image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A best.pt an epoch ahead of last.pt's best-epoch record (a run stopped between the two
    writes: best.pt goes first): the record follows the file."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=3)
    ahead = load_checkpoint(run_dir / "best.pt")
    ahead["best"] = {"epoch": 2, "val_acc": 101.0}  # as epoch 2's best.pt, before its last.pt
    ahead["epoch"] = 2
    save_atomic(ahead, run_dir / "best.pt")
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        train(config, resume=run_dir / "last.pt")
    assert "best.pt holds epoch 2, last.pt records epoch 1 as the best: keeping best.pt's" in (
        caplog.text
    )
    # Epoch 2, trained again, does not beat the record best.pt holds: best.pt stays.
    assert load_checkpoint(run_dir / "best.pt")["best"] == {"epoch": 2, "val_acc": 101.0}
    assert json.loads((run_dir / "summary.json").read_text())["best"]["epoch"] == 2


def test_a_best_pt_behind_a_best_epoch_that_is_last_pts_is_rebuilt_from_it(
    image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Versions before 2026-11-27 wrote last.pt first: stopped between the writes, last.pt
    records its own epoch as the best and best.pt still holds an earlier one. The resume
    followed best.pt's record, and the best epoch's weights (last.pt's) were never kept."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=3)
    earlier = (run_dir / "best.pt").read_bytes()  # epoch 1's
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=run_dir / "last.pt", hooks=Interrupt(epoch=2).hooks())
    last = load_checkpoint(run_dir / "last.pt")
    last["best"] = {"epoch": 2, "val_acc": 101.0}  # epoch 2 the best, whatever tiny runs give
    save_atomic(last, run_dir / "last.pt")
    (run_dir / "best.pt").write_bytes(earlier)
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        train(config, resume=run_dir / "last.pt")
    assert (
        "best.pt holds epoch 1, behind the best epoch 2 that last.pt records and holds: "
        "rebuilding it from last.pt" in caplog.text
    )
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == 2 and best["best"] == {"epoch": 2, "val_acc": 101.0}
    for name, tensor in best["model"]["state_dict"].items():
        assert torch.equal(tensor, last["model"]["state_dict"][name]), name


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_an_epochs_checkpoints_are_queued_leaves_both(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, sig: int
) -> None:
    """A stop that came after best.pt was queued and before last.pt was: the first epoch's
    best.pt stayed alone ('nothing to resume'), and the same command then refused the folder."""
    real = trainer_module.to_cpu

    def to_cpu(tree: Any, **kwargs: Any) -> Any:
        if isinstance(tree, dict) and "param_groups" in tree:  # last.pt's optimizer snapshot
            signal.raise_signal(sig)
        return real(tree, **kwargs)

    class Stopped(KeyboardInterrupt):
        pass

    def terminate(signum: int, frame: object) -> None:
        raise Stopped  # as python -m training.run's SIGTERM handler does

    monkeypatch.setattr(trainer_module, "to_cpu", to_cpu)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config("seed", image_tree, run_dir, epochs=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 1


def test_a_figure_matplotlib_fails_to_draw_does_not_stop_the_run(
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It raised after the test evaluation, before summary.json and the final last.pt: the run
    could never finish, as a resume drew it again."""

    def fail(*args: Any) -> None:
        raise ValueError("Unknown symbol: \\foo\n  at line 1")

    monkeypatch.setattr(trainer_module.report, "plot_confusion", fail)
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        result = train(tiny_config("seed", image_tree, run_dir, epochs=1))
    assert load_checkpoint(run_dir / "last.pt")["test"] == result.test
    assert (run_dir / "summary.json").is_file() and (run_dir / "curves.png").is_file()
    assert not (run_dir / "confusion.png").exists()
    assert (
        "confusion.png not drawn (ValueError: Unknown symbol: \\foo); the run's results are in "
        "summary.json" in caplog.text
    )


def test_resume_removes_half_written_checkpoints_of_a_killed_process(
    image_tree: Path, run_dir: Path
) -> None:
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=2)
    stale = [run_dir / ".last.pt.99999.tmp", run_dir / ".best.pt.99998.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")  # what SIGKILL mid-write leaves
    (run_dir / ".notes.tmp").write_text("not ours")
    train(config, resume=run_dir / "last.pt")
    assert not any(path.exists() for path in stale)
    assert (run_dir / ".notes.tmp").read_text() == "not ours"


def test_a_run_stopped_before_its_first_checkpoint_says_there_is_nothing_to_resume(
    image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config("seed", image_tree, run_dir, epochs=2)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1, step=1).hooks())
    assert "stopped before the first epoch ended: nothing to resume" in caplog.text
    assert "--resume" not in caplog.text
    assert not (run_dir / "last.pt").exists()


def test_a_resume_overtaken_while_decoding_is_refused(image_tree: Path, run_dir: Path) -> None:
    """The folder's lock is taken after decoding: another resume of the same run may start,
    train and finish in that time. Training on from the last.pt read before it would overwrite
    its newer epochs, so the late one stops instead, and its rerun continues from them."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=2)
    real_load_data = trainer_module.load_data
    calls: list[int] = []

    def overtaken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # this run's decoding: the other resume runs, start to end
            train(config, resume=run_dir / "last.pt")
        return real_load_data(*args, **kwargs)

    with (
        patch.object(trainer_module, "load_data", side_effect=overtaken),
        pytest.raises(UserError, match=r"last.pt was rewritten by another training process"),
    ):
        train(config, resume=run_dir / "last.pt")
    finished = load_checkpoint(run_dir / "last.pt")
    assert finished["epoch"] == 2 and finished["test"] is not None  # the other one's, intact
    with pytest.raises(UserError, match=r"already finished all 2 epochs"):
        train(config, resume=run_dir / "last.pt")


def test_a_run_folder_in_use_by_another_process_is_refused(image_tree: Path, run_dir: Path) -> None:
    """Two processes in one folder would overwrite each other's checkpoints in turn."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_locked_by_another_process(run_dir):
        with (
            patch.object(trainer_module, "load_data", side_effect=AssertionError("decoded")),
            pytest.raises(
                UserError,
                match=r"in use by another training process; wait for it to end or choose another --out-dir",
            ),
        ):  # refused before the data is decoded
            train(tiny_config("seed", image_tree, run_dir, epochs=1))
        assert not (run_dir / "last.pt").exists()
    # The lock went with its process: no stale lock to clean up.
    result = train(tiny_config("seed", image_tree, run_dir, epochs=1))
    assert result.last.exists() and result.test["accuracy"] >= 0


def test_a_resume_of_a_run_in_progress_is_refused_before_its_files_are_read(
    image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Between its two writes a running run's best.pt is an epoch ahead of last.pt's record:
    a resume of it warned about that, and only then said the folder was in use."""
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=3)
    best = load_checkpoint(run_dir / "best.pt")
    best["best"] = {**best["best"], "epoch": 2}  # as epoch 2's best.pt, before its last.pt
    save_atomic(best, run_dir / "best.pt")
    with (
        folder_locked_by_another_process(run_dir),
        caplog.at_level(logging.WARNING, logger="training.trainer"),
        pytest.raises(UserError, match=r"in use by another training process; wait for it to end$"),
    ):
        train(config, resume=run_dir / "last.pt")
    assert "best.pt holds epoch" not in caplog.text


def test_an_out_dir_that_is_a_file_is_refused_before_decoding(
    image_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("not a folder")
    with (
        patch.object(trainer_module, "load_data", side_effect=AssertionError("decoded")),
        pytest.raises(UserError, match=r"^--out-dir .*notes.txt is a file; choose a folder$"),
    ):
        train(tiny_config("seed", image_tree, out, epochs=1))
    assert out.read_text() == "not a folder"


def test_an_out_dir_that_cannot_be_used_is_refused_before_decoding(
    image_tree: Path, tmp_path: Path
) -> None:
    """Another run's files, a dangling symlink, a parent that is a file: each refused before
    the data is decoded (minutes for a large set); they were found only after it."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "last.pt").write_bytes(b"another run")
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone", target_is_directory=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (used, r"already holds a run; continue it with --resume"),
        (other, r"already holds files of another run \(summary\.json\)"),
        (dangling, r"is a symbolic link to .*gone, which does not exist; create that folder"),
        (a_file / "sub", r"cannot write to .*sub: Not a directory; choose another --out-dir"),
    ]
    for out, message in cases:
        with (
            patch.object(trainer_module, "load_data", side_effect=AssertionError("decoded")),
            pytest.raises(UserError, match=message),
        ):
            train(tiny_config("seed", image_tree, out, epochs=1))
    assert (used / "last.pt").read_bytes() == b"another run" and not (tmp_path / "gone").exists()


def test_the_commands_a_stopped_run_suggests_work_when_pasted(
    image_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run folder with a space in its path: the suggested --resume split in two when pasted.
    And a finished run's folder suggested a resume that only said 'nothing to resume'."""
    out = tmp_path / "my run"
    config = tiny_config("seed", image_tree, out, epochs=2)
    with (
        caplog.at_level(logging.WARNING, logger="training.trainer"),
        pytest.raises(KeyboardInterrupt),
    ):
        train(config, hooks=Interrupt(epoch=1).hooks())
    [line] = [r.getMessage() for r in caplog.records if "continue with" in r.getMessage()]
    command = shlex.split(line.partition("continue with: ")[2])
    assert command == ["python", "-m", "training.run", "--resume", str(out / "last.pt")]
    with pytest.raises(UserError) as used:
        train(config)
    hint = (
        str(used.value)
        .partition("continue it with ")[2]
        .removesuffix(" or choose another --out-dir")
    )
    assert shlex.split(hint) == ["--resume", str(out / "last.pt")]
    train(config, resume=out / "last.pt")  # finishes the run
    with pytest.raises(UserError) as finished:
        train(config)
    assert str(finished.value) == f"{out} already holds a finished run; choose another --out-dir"


def test_a_read_only_out_dir_is_refused_before_decoding_and_not_created(
    image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root every folder is writable to os.access, but not on a read-only file system."""
    import types

    flags = types.SimpleNamespace(f_flag=os.ST_RDONLY)
    monkeypatch.setattr(trainer_module.os, "access", lambda path, mode: False)
    monkeypatch.setattr(trainer_module.os, "statvfs", lambda path: flags)
    out = tmp_path / "mnt" / "run"
    with (
        patch.object(trainer_module, "load_data", side_effect=AssertionError("decoded")),
        pytest.raises(UserError, match=r"cannot write to .*run: Read-only file system; choose"),
    ):
        train(tiny_config("seed", image_tree, out, epochs=1))
    assert not (tmp_path / "mnt").exists()


def test_a_default_run_folder_that_cannot_be_made_is_refused_before_decoding(
    image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out-dir the run's folder goes in ./runs: a file of that name was found only
    once the data was decoded (minutes for a large set)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    with (
        patch.object(trainer_module, "load_data", side_effect=AssertionError("decoded")),
        pytest.raises(
            UserError, match=r"^cannot write to runs/seed-[0-9-]+: Not a directory; choose another"
        ),
    ):
        train(replace(tiny_config("seed", image_tree, tmp_path, epochs=1), out_dir=None))


def test_a_resume_whose_data_folder_moved_says_to_pass_data_dir(
    tree_factory: Any, run_dir: Path, tmp_path: Path
) -> None:
    """It said '--data-dir ... is not a directory', a flag the user had not passed."""
    data = tree_factory(tmp_path / "data" / "cifar10")
    config = stopped_after_epoch_1(data, run_dir, epochs=2)
    moved = tmp_path / "moved-data"
    data.rename(moved)
    with pytest.raises(UserError, match=r"data folder .* is gone; resume with --data-dir DIR"):
        train(config, resume=run_dir / "last.pt")
    result = train(
        replace(config, data_dir=moved), resume=run_dir / "last.pt", explicit={"data_dir"}
    )
    assert load_checkpoint(result.last)["epoch"] == 2


def test_runs_started_in_the_same_second_get_a_folder_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out-dir the folder is runs/<recipe>-<time>, to the second: a sweep launched in
    parallel put its runs in one folder, and all but the first were refused as 'in use by
    another training process; ... choose another --out-dir' (after decoding the data)."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cls(2026, 11, 27, 12, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_module, "datetime", Frozen)
    config = TrainConfig(recipe="fast")
    folders = [trainer_module._choose_out_dir(config, None, Distributed()) for _ in range(3)]
    assert [f.as_posix() for f in folders] == [
        "runs/fast-20261127-120000",
        "runs/fast-20261127-120000-2",
        "runs/fast-20261127-120000-3",
    ]
    assert all(f.is_dir() for f in folders)


def test_a_run_that_diverges_stops_with_one_line_and_keeps_its_last_good_epoch(
    image_tree: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config("seed", image_tree, run_dir, lr=1e8, epochs=3)  # NaN by epoch 2 here
    with caplog.at_level(logging.WARNING), pytest.raises(UserError) as caught:
        train(config)
    found = re.search(r"the training loss became (nan|inf) in epoch (\d)", str(caught.value))
    assert found and "lower --lr" in str(caught.value), str(caught.value)
    assert "--resume" not in caplog.text  # resuming would diverge again
    diverged = int(found.group(2))
    if diverged > 1:  # the epochs before it are kept; its own weights are not saved
        assert load_checkpoint(run_dir / "last.pt")["epoch"] == diverged - 1
    else:
        assert not (run_dir / "last.pt").exists()


def test_resume_refuses_changed_settings(
    image_tree: Path, run_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = stopped_after_epoch_1(image_tree, run_dir, epochs=2)
    last = run_dir / "last.pt"
    changed = tiny_config("seed", image_tree, run_dir, lr=0.1, epochs=3)
    with pytest.raises(UserError, match=r"--epochs, --lr cannot change when resuming"):
        train(changed, resume=last, explicit={"lr", "epochs", "device"})
    # Neither can the recipe, nor the folder (both were silently ignored).
    with pytest.raises(UserError, match=r"--recipe cannot change when resuming"):
        train(tiny_config("fast", image_tree, run_dir), resume=last, explicit={"recipe"})
    elsewhere = tiny_config("seed", image_tree, run_dir / "elsewhere")
    with pytest.raises(UserError, match=r"continues in its own folder.*drop --out-dir"):
        train(elsewhere, resume=last, explicit={"out_dir"})
    fewer = make_image_tree(tmp_path_factory.mktemp("fewer"), n_train=4, n_test=1)
    with pytest.raises(UserError) as info:
        train(tiny_config("seed", fewer, run_dir), resume=last, explicit={"data_dir"})
    assert str(info.value) == (
        f"the data is not what {last} was trained on: the data has 9 training images, the run "
        "had 18; resume with the data it was trained on (--data-dir DIR), or start a new run"
    )
    # Only the classes that differ are named (both lists in full hid them among the others).
    renamed = make_image_tree(tmp_path_factory.mktemp("renamed"), classes=("red", "green", "teal"))
    with pytest.raises(UserError) as info:
        train(tiny_config("seed", renamed, run_dir), resume=last, explicit={"data_dir"})
    message = str(info.value).replace(str(last), "LAST")
    assert "LAST was trained on: only in the data: ['teal']; only in the run: ['blue']; " in message
    assert "green" not in message and "red" not in message and "training images" not in message
    with pytest.raises(UserError, match="already holds a run"):
        train(config)


def test_onecycle_warmup_of_one_step_is_a_clear_error(image_tree: Path, run_dir: Path) -> None:
    # 4 steps x warmup 0.25 = 1 step: torch's OneCycleLR would divide by zero.
    with pytest.raises(UserError, match=r"warm-up of more than 1 step, but --warmup 0.25 of 4"):
        train(tiny_config("fast", image_tree, run_dir))
    assert not (run_dir / "last.pt").exists()


def test_a_run_with_the_gpu_warm_up_trains_exactly_as_one_without(
    uninterrupted: dict[str, Any],
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On CUDA a stand-in model trains two steps while the data decodes (training.warmup);
    forced on here, the run must come out bit for bit as the one without it."""
    monkeypatch.setattr(trainer_module, "_wants_warmup", lambda device: True)
    with caplog.at_level(logging.INFO, logger="training.trainer"):
        train(tiny_config("fast", image_tree, run_dir, warmup=FAST_WARMUP))
    assert "CPU warm-up" in caplog.text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["warmup_seconds"] > 0 and summary["load_seconds"] >= summary["warmup_seconds"]
    assert uninterrupted["summary"]["warmup_seconds"] is None
    _assert_same_run(_load_state(run_dir / "last.pt"), uninterrupted)


def test_no_gpu_warmup_turns_the_warm_up_off(
    image_tree: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "_wants_warmup", lambda device: True)
    monkeypatch.setattr(trainer_module, "warm_up", _never_called)
    train(tiny_config("seed", image_tree, run_dir, epochs=1, gpu_warmup=False))
    assert json.loads((run_dir / "summary.json").read_text())["warmup_seconds"] is None


def _never_called(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the warm-up ran")


def test_a_failed_warm_up_is_a_warning_and_the_run_goes_on(
    image_tree: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(trainer_module, "_wants_warmup", lambda device: True)
    monkeypatch.setattr(trainer_module, "warm_up", out_of_memory)
    with caplog.at_level(logging.INFO, logger="training.trainer"):
        result = train(tiny_config("seed", image_tree, run_dir, epochs=1))
    assert "GPU warm-up failed, training without it: CUDA out of memory." in caplog.text
    assert "more detail" not in caplog.text and "warm-up 0" not in caplog.text
    assert json.loads((run_dir / "summary.json").read_text())["warmup_seconds"] is None
    assert result.last.exists()


# ---- the GPU defaults, where a CPU can check them ---------------------------------------------


def test_cuda_defaults_bf16_channels_last_and_graphs_on_one_gpu(image_tree: Path) -> None:
    cuda, cpu, alone, ddp = (
        torch.device("cuda"),
        torch.device("cpu"),
        Distributed(),
        Distributed(0, 2, 0),
    )
    cfg = tiny_config("fast", image_tree, Path("unused"))
    assert _precision(cfg, cuda) == Precision(torch.bfloat16, channels_last=True)
    assert _precision(cfg, cpu) == FP32
    forced = tiny_config("fast", image_tree, Path("unused"), precision="bf16", channels_last=False)
    assert _precision(forced, cpu) == Precision(torch.bfloat16, channels_last=False)
    assert _use_graphs(cfg, cuda, alone) and not _use_graphs(cfg, cuda, ddp)
    assert not _use_graphs(cfg, cpu, alone)
    graphs = tiny_config("fast", image_tree, Path("unused"), cuda_graphs=True)
    with pytest.raises(UserError, match="needs a CUDA device"):
        _use_graphs(graphs, cpu, alone)
    with pytest.raises(UserError, match="single-GPU only"):
        _use_graphs(graphs, cuda, ddp)


def test_a_bf16_channels_last_run_trains_and_saves_fp32_weights(
    image_tree: Path, run_dir: Path
) -> None:
    """bf16 autocast and channels_last are what every GPU run uses; on a CPU they run too."""
    cfg = tiny_config(
        "fast", image_tree, run_dir, precision="bf16", channels_last=True, warmup=FAST_WARMUP
    )
    result = train(cfg)
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in result.metrics)
    last = load_checkpoint(result.last)
    assert (last["config"]["precision"], last["config"]["channels_last"]) == ("bf16", True)
    state = last["model"]["state_dict"]
    floats = [v for k, v in state.items() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)  # autocast keeps fp32 weights
    assert all(torch.isfinite(v).all() for v in floats)
    assert 0 <= result.test["accuracy"] <= 100


def test_a_batch_larger_than_the_training_split_is_a_clear_error(
    image_tree: Path, run_dir: Path
) -> None:
    with pytest.raises(UserError, match="larger than the 18 training images"):
        train(tiny_config("seed", image_tree, run_dir, batch_size=64))
    assert not (run_dir / "last.pt").exists()


def test_a_resume_through_a_link_to_last_pt_continues_the_run_in_its_folder(
    image_tree: Path, run_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The link's folder used to be taken for the run's: best.pt was "missing" there."""
    config = tiny_config("seed", image_tree, run_dir, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, hooks=Interrupt(epoch=1).hooks())
    link = tmp_path_factory.mktemp("elsewhere") / "latest.pt"
    link.symlink_to(run_dir / "last.pt")
    result = train(config, resume=link)
    assert result.out_dir == run_dir and load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    assert link.is_symlink() and sorted(p.name for p in link.parent.iterdir()) == ["latest.pt"]
