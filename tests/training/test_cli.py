"""`python -m training.run` as a user runs it: help, one-line errors, and a 2-process DDP run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    ROOT,
    STOP_WHEN_IMPORTED,
    TreeFactory,
    assert_one_line_error,
    cli_env,
    folder_locked_by_another_process,
    run_cli,
)
from training.checkpoint import load_checkpoint
from training.trainer import RunResult


def test_help_documents_the_main_flags() -> None:
    result = run_cli("-m", "training.run", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--recipe", "--resume", "--data-dir", "--epochs", "--batch-size", "--device"):
        assert flag in result.stdout, flag
    assert "fast" in result.stdout and "seed" in result.stdout  # the recipes and their values
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("training.run", ["--out-dir", ""]),
        ("training.run", ["--resume", " "]),
        ("training.export", ["last.pt", "--out", ""]),
        ("training.evaluate", ["weights", "--data-dir", ""]),
        ("app.client", ["evaluate", "--data-dir", ""]),
    ],
)
def test_an_empty_path_is_refused_before_anything_runs(
    module: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--out "$OUT"` with OUT unset is Path("."): an export installed its shards into the
    current folder, a run wrote its 700 MB of checkpoints there."""
    import importlib

    monkeypatch.chdir(ROOT)  # were it accepted, this is where it would write
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(module).main(argv)
    assert stop.value.code == 2
    assert "an empty path (an unset variable?)" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "-m", "training.run", "--data-dir", "/nonexistent", "--device", "cpu",
        "--out-dir", tmp_path / "run",
    )  # fmt: skip
    assert_one_line_error(result, "--data-dir /nonexistent is not a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_unreadable_image_is_one_line_before_training(
    tmp_path: Path, tree_factory: TreeFactory
) -> None:
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1)
    bad = root / "train" / "green" / "notes.jpg"
    bad.write_text("not an image")
    result = run_cli(
        "-m", "training.run", "--data-dir", root, "--device", "cpu",
        "--out-dir", tmp_path / "run",
    )  # fmt: skip
    assert_one_line_error(result, f"cannot read image {bad}: ", "remove or replace it")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(image_tree: Path, tmp_path: Path) -> None:
    result = run_cli(
        "-m", "training.run", "--device", "cuda", "--data-dir", image_tree,
        "--out-dir", tmp_path / "run",
    )  # fmt: skip
    assert_one_line_error(result, "'cuda'", "CUDA is not available", "use cpu or auto")


@pytest.mark.slow
def test_invalid_setting_is_one_line(image_tree: Path, tmp_path: Path) -> None:
    result = run_cli(
        "-m", "training.run", "--data-dir", image_tree, "--epochs", "0", "--valid-size", "2",
        "--out-dir", tmp_path / "run",
    )  # fmt: skip
    line = assert_one_line_error(result, "--epochs must be at least 1")
    assert "--valid-size must be between 0 and 1" in line


def _bad_checkpoint(kind: str, path: Path, seed_run: RunResult) -> None:
    if kind == "corrupt":
        path.write_bytes(os.urandom(100_000))
    elif kind == "truncated":  # the first half of a real last.pt
        with open(seed_run.last, "rb") as f:
            path.write_bytes(f.read(seed_run.last.stat().st_size // 2))
    else:
        torch.save({"a": 1}, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt", "is not a readable checkpoint"),
        ("truncated", "is not a readable checkpoint"),
        ("foreign", "is not an alexnet-serve checkpoint"),
    ],
)
def test_resume_from_a_bad_checkpoint_is_one_line(
    kind: str, message: str, run_dir: Path, seed_run: RunResult, image_tree: Path
) -> None:
    bad = run_dir / f"{kind}.pt"
    _bad_checkpoint(kind, bad, seed_run)
    result = run_cli("-m", "training.run", "--resume", bad, "--data-dir", image_tree)
    assert_one_line_error(result, str(bad), message)


@pytest.mark.slow
def test_a_ddp_run_refused_by_rank_0_stops_every_rank_with_its_message(
    image_tree: Path, tmp_path: Path
) -> None:
    """Only rank 0 checks and locks the run folder; the other ranks used to train on and die
    with a gloo traceback once rank 0 had left."""
    out = tmp_path / "busy"
    out.mkdir()
    with folder_locked_by_another_process(out):
        result = run_cli(
            "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "training.run", "--data-dir", image_tree, "--device", "cpu", "--epochs", "1",
            "--batch-size", "8", "--valid-size", "0.25", "--out-dir", out,
            timeout=300,
            env=cli_env(OMP_NUM_THREADS="1"),
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("is in use by another training process") == 2, output[-3000:]  # a rank each
    assert "Connection closed" not in output and "[rank1]: Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_two_process_ddp_run(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = run_cli(
        "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "training.run", "--data-dir", image_tree, "--device", "cpu", "--epochs", "1",
        "--batch-size", "8", "--valid-size", "0.25", "--eval-batch-size", "16",
        "--out-dir", out,
        timeout=300,
        env=cli_env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2
    assert ckpt["epoch"] == 1 and len(ckpt["metrics"]) == 1
    assert ckpt["step"] == 2  # 18 images: 2 global batches of 8, 4 per process
    assert ckpt["test"] is not None and ckpt["test"]["images"] == 6
    assert "optimizer" in ckpt
    assert load_checkpoint(out / "best.pt")["world_size"] == 2
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    # Only rank 0 wrote: no stray per-rank files or temp files.
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "confusion.png", "curves.png", "last.pt", "metrics.jsonl", "summary.json",
    ]  # fmt: skip
    for path in out.glob("*.pt"):
        path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stop_while_pytorch_loads_ends_quietly(
    sig: int, status: int, image_tree: Path, tmp_path: Path
) -> None:
    """Ctrl-C in a run's first seconds, while PyTorch loads, was raised inside its import: a
    traceback from deep inside torch or NumPy, or an abort from torch's C++ ('terminate called
    after throwing an instance of pybind11::error_already_set'); SIGTERM killed the process
    outright. Both now stop it as a stop anywhere else does, before anything is written."""
    result = run_cli(
        "-c", STOP_WHEN_IMPORTED, int(sig), "torch", "training.run", "--data-dir", image_tree,
        "--device", "cpu", "--out-dir", tmp_path / "run",
    )  # fmt: skip
    assert result.returncode == status, result.stderr
    assert result.stderr == "", result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "status"),
    [((signal.SIGTERM,), 128 + signal.SIGTERM), ((signal.SIGINT, signal.SIGINT), 130)],
    ids=["sigterm", "ctrl-c-twice"],
)
def test_a_stop_while_last_pt_is_written_keeps_it(
    signals: tuple[int, ...], status: int, image_tree: Path, tmp_path: Path
) -> None:
    """`kill`, `docker stop` or a scheduler's preemption sends SIGTERM; an impatient user
    presses Ctrl-C twice. Both used to end the process at once (the second Ctrl-C with an
    abort, 'terminate called without an active exception') while last.pt was being written in
    the background right after epoch 1: it was lost, only best.pt and a half-written temp file
    were left, and the run could not be resumed."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-u", "-m", "training.run", "--data-dir", image_tree, "--device", "cpu",
        "--epochs", "3", "--batch-size", "8", "--valid-size", "0.25", "--eval-batch-size", "16",
        "--out-dir", out,
    ]  # fmt: skip
    with subprocess.Popen(
        list(map(str, command)), cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    ) as process:  # fmt: skip
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if line.startswith("epoch 1/3"):  # last.pt is being written now
                    for sig in signals:
                        process.send_signal(sig)
                        time.sleep(0.1)
                    break
            output = process.communicate(timeout=120)[0]
        finally:
            process.kill()
    assert process.returncode == status, output
    assert "Traceback" not in output and "terminate called" not in output, output
    assert f"--resume {out / 'last.pt'}" in output
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_restart_best_without_resume_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from training.run import main

    assert main(["--restart-best"]) == 2
    assert capsys.readouterr().err == "error: --restart-best goes with --resume\n"
