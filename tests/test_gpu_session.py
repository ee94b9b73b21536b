"""bench.gpu_session, the one command a GPU session gets: what protects its results when a
step hangs or the session is cut off (its GPU work itself is tried by a CPU smoke run)."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_session


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap an orphan)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\tZ" not in next(
            x for x in status.read_text().splitlines() if x.startswith("State")
        )
    except FileNotFoundError:
        return False


def test_a_step_still_running_at_the_deadline_is_killed_with_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hang (code never run on a GPU before) cost every later step: the session waited on
    it until the device tool's limit killed everything."""
    monkeypatch.setattr(gpu_session, "SESSION_LOG", [tmp_path / "session.txt"])
    monkeypatch.setattr(gpu_session, "DEADLINE", [time.perf_counter() - gpu_session.T0 + 2])
    worker = (
        "import subprocess, sys, time; "
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print('worker', w.pid, flush=True); time.sleep(120)"
    )
    code, _ = gpu_session.run([sys.executable, "-c", worker], tmp_path / "step.txt")
    assert code != 0
    log = (tmp_path / "step.txt").read_text()
    pid = int(log.split("worker ")[1].split()[0])  # its output up to the kill was kept
    # SIGKILL reaches the worker asynchronously (only the step itself is waited for): checked
    # at once, it was sometimes still running for a moment. A bounded wait, not a timing.
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid), "the step's worker process outlived the step"
    assert "timed out" in (tmp_path / "session.txt").read_text()
    assert gpu_session.CURRENT == []


def test_a_step_that_ends_in_time_keeps_its_exit_code_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_session, "DEADLINE", [float("inf")])
    code, _ = gpu_session.run(
        [sys.executable, "-c", "print('measured'); raise SystemExit(3)"], tmp_path / "step.txt"
    )
    assert code == 3 and "measured" in (tmp_path / "step.txt").read_text()


def test_results_tgz_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while results.tgz was rewritten (a dozen times a session) left a truncated
    archive: every log and summary lost. It is written beside and renamed."""
    out, logs, work = tmp_path / "out", tmp_path / "work" / "logs", tmp_path / "work"
    out.mkdir()
    logs.mkdir(parents=True)
    (logs / "run-fast.txt").write_text("epoch 1/16 ...\n")
    gpu_session.pack_atomic(out, logs, work)
    (logs / "run-seed.txt").write_text("epoch 1/20 ...\n")

    def killed_midway(self: tarfile.TarFile, name: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "add", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        gpu_session.pack_atomic(out, logs, work)
    monkeypatch.undo()
    with tarfile.open(out / "results.tgz") as tar:
        assert tar.getnames() == ["logs", "logs/run-fast.txt"]


def test_a_flag_set_of_one_flag_is_taken_as_the_value() -> None:
    """`--seed-variants "--early-sgd"` stopped the session before it started: argparse took
    the value for an option ("expected one argument")."""
    argv = ["--out", "o", "--seed-variants", "--early-sgd", "--variants", "--epochs 17; --x"]
    assert gpu_session._glued(argv) == [
        "--out", "o", "--seed-variants=--early-sgd", "--variants=--epochs 17; --x"
    ]  # fmt: skip


def test_a_missing_tarball_is_one_line_and_leaves_no_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was a FileNotFoundError traceback after the work folder (/tmp/alexnet-gpu-*) had
    been made, with no session.txt in it, and --out created."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(gpu_session, "EXTRA", [])
    monkeypatch.setattr(gpu_session, "SESSION_LOG", [])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the test process keeps its own
    out = tmp_path / "out"
    argv = ["gpu_session", "--tarball", str(tmp_path / "missing.tgz"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        gpu_session.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(
        f"error: --tarball {tmp_path / 'missing.tgz'}: no such file"
    )
    assert "Traceback" not in err
    assert list(temp.iterdir()) == [] and not out.exists()


def test_a_runs_summary_records_the_command_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary's command held only the run's own flags, not --device, the smoke flags or
    the --no-cuda-graphs that every run after the fast-eager fallback got."""
    commands: list[list[str]] = []

    def ran(cmd: list[str], log: Path) -> tuple[int, float]:
        commands.append(cmd)
        out = Path(cmd[cmd.index("--out-dir") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(
            json.dumps({"test": {"accuracy": 80.0}, "train_seconds": 1.0})
        )
        return 0, 2.0

    monkeypatch.setattr(gpu_session, "run", ran)
    monkeypatch.setattr(
        gpu_session, "EXTRA", ["--device", "cpu", "--epochs", "1", "--no-cuda-graphs"]
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    summary = gpu_session.train("seed", ["--recipe", "seed"], tmp_path / "data", tmp_path, logs)
    assert summary is not None
    (cmd,) = commands
    assert summary["command"] == "python -m training.run " + shlex.join(cmd[3:])
    assert summary["command"].endswith("--recipe seed --device cpu --epochs 1 --no-cuda-graphs")
    saved = json.loads((logs / "summary-seed.json").read_text())
    assert saved["command"] == summary["command"]


@pytest.mark.parametrize("smoke", ["", "--epochs 1"])
def test_the_smoke_runs_train_speed_has_no_warmup_steps(smoke: str, tmp_path: Path) -> None:
    """The smoke run's train_speed step took minutes: 10 warm-up steps per row (the default)
    for 2 timed ones."""
    args = argparse.Namespace(device="cpu", smoke=smoke)
    cmd = gpu_session.train_speed_command(args, tmp_path / "data", tmp_path)
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    if smoke:
        assert (flags["--steps"], flags["--notebook-steps"], flags["--warmup"]) == ("2", "1", "0")
    else:  # the GPU session's own figures keep train_speed's warm-up
        assert (flags["--steps"], flags["--notebook-steps"]) == ("50", "30")
        assert "--warmup" not in flags
    assert flags["--json-out"] == str(tmp_path / "train_speed.json")
