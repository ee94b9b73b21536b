"""bench.gpu_session, the one command a GPU session gets: what protects its results when a
step hangs or the session is cut off (its GPU work itself is tried by a CPU smoke run)."""

from __future__ import annotations

import sys
import tarfile
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
