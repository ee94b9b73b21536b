"""Ctrl-C in a command's first seconds, or while the client waits on the server: a quiet exit
with the shell's status for it (130), never a traceback; and a reader of its output that goes
away (`| head -1`): the command runs to its end with its own status. (Ctrl-C in training.run:
tests/training/test_cli.py.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    ROOT,
    STOP_WHEN_IMPORTED,
    cli_env,
    run_cli,
    run_cli_into_a_closed_pipe,
    write_image,
)

WEIGHTS = ROOT / "weights"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "name", "args"),
    [
        ("training.evaluate", "torch", [WEIGHTS, "--data-dir", "{tmp}"]),
        ("training.export", "torch", ["{tmp}/last.pt", "--out", "{tmp}/out"]),
        ("app", "torch", ["--checkpoint", WEIGHTS]),
        # After PyTorch: the service's own modules, then the model's load and warm-up.
        ("app", "app.predictor", ["--checkpoint", WEIGHTS, "--device", "cpu"]),
        # Model loaded, uvicorn starting: it swallowed the Ctrl-C and served on.
        ("app", "uvicorn.loops.auto", ["--checkpoint", WEIGHTS, "--device", "cpu"]),
    ],
    ids=["evaluate", "export", "serve", "serve-loading", "serve-starting-uvicorn"],
)
def test_ctrl_c_while_a_command_starts_ends_quietly(
    module: str, name: str, args: list[str | Path], tmp_path: Path
) -> None:
    """Each printed a KeyboardInterrupt traceback from inside `import torch` (or an abort from
    torch's C++), or, for the service, from the thread that loads the model."""
    argv = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli("-c", STOP_WHEN_IMPORTED, int(signal.SIGINT), name, module, *argv, timeout=90)
    assert result.returncode == 130, result.stderr
    assert "Application startup complete" not in result.stderr  # it never served
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    if name == "torch":  # stopped before anything ran
        assert result.stderr == "" and result.stdout == ""
    assert not (tmp_path / "out").exists()


# `python -c SLOW_LOAD ARGS...` is `python -m app ARGS...` whose model load takes a minute and
# gets a Ctrl-C as it starts (the thread that loads runs no Python a hook could stop on).
SLOW_LOAD = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import app.predictor

def slow_load(*args):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(60)

app.predictor._load = slow_load
sys.argv = ["app", *sys.argv[1:]]
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_ctrl_c_while_the_model_loads_exits_without_waiting_for_the_load() -> None:
    """The exit waited for the load thread (1.5-1.9 s on 2 cores; longer on a GPU), and a
    second Ctrl-C in that wait aborted the interpreter: 'terminate called without an active
    exception'."""
    # The timeout fails the test if the process sits out the 60 s load.
    result = run_cli("-c", SLOW_LOAD, "--checkpoint", WEIGHTS, "--device", "cpu", timeout=50)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "terminate" not in result.stderr


def test_the_client_starts_without_pytorch() -> None:
    """`app.client` needs only HTTP and a folder listing: it imported PyTorch (through
    training.data) and took 1.9 s to start on 2 cores, a window in which Ctrl-C gave a
    traceback."""
    code = "import sys, app.client; print(sorted({m.split('.')[0] for m in sys.modules}))"
    result = run_cli("-c", code)
    assert result.returncode == 0, result.stderr
    assert "'torch'" not in result.stdout and "'numpy'" not in result.stdout


def test_the_evaluate_command_offers_every_inference_precision() -> None:
    from training.engine import INFERENCE_PRECISIONS
    from training.evaluate import PRECISIONS

    assert PRECISIONS == INFERENCE_PRECISIONS


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_ctrl_c_while_the_client_waits_ends_quietly(command: str, tmp_path: Path) -> None:
    """A server that takes its time (a big batch, a slow GPU): Ctrl-C raised out of
    asyncio.run with a traceback."""
    image = write_image(tmp_path / "test" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        connection, _ = listener.accept()  # and never answer
        held.append(connection)
        accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    args = [str(image)] if command == "predict" else ["--data-dir", str(tmp_path)]
    script = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['app.client', *sys.argv[1:]]; "
        "runpy.run_module('app.client', run_name='__main__', alter_sys=True)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, command, *args, "--url", url],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            assert accepted.wait(60), "the client never connected"
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            process.kill()
            listener.close()
            for connection in held:
                connection.close()
    assert process.returncode == 130, err
    assert err == "", err


# ---- a reader that goes away: `... | head -1` ----------------------------------------------


@pytest.mark.slow
def test_evaluate_into_a_closed_pipe_writes_its_predictions_and_ends_quietly(
    tmp_path: Path,
) -> None:
    """It printed a BrokenPipeError traceback, and --predictions-out, written after the
    report, was never written. It now runs to its end, its output dropped."""
    from training.artifact import read_index

    for k, name in enumerate(read_index(WEIGHTS)["classes"]):
        write_image(tmp_path / "test" / name / "0.png", np.full((32, 32, 3), 20 * k, np.uint8))
    out = tmp_path / "predictions.json"
    result = run_cli_into_a_closed_pipe(
        "-m", "training.evaluate", WEIGHTS, "--data-dir", tmp_path, "--device", "cpu",
        "--predictions-out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
    assert len(json.loads(out.read_text())) == 10


@pytest.mark.slow
def test_a_training_run_into_a_closed_pipe_goes_on_quietly(
    image_tree: Path, tmp_path: Path
) -> None:
    """Each epoch's log line printed a 'Logging error' traceback on stderr."""
    out = tmp_path / "run"
    result = run_cli_into_a_closed_pipe(
        "-m", "training.run", "--data-dir", image_tree, "--out-dir", out, "--device", "cpu",
        "--epochs", "2", "--batch-size", "8", "--valid-size", "0.25", "--eval-batch-size", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["training.run", "--epochs", "0"], 2),
        (["training.run", "--no-such-flag"], 2),  # argparse's own error
        (["training.evaluate", "missing.pt"], 2),
        (["training.export", "missing.pt", "--out", "w"], 2),
    ],
    ids=["run-bad-value", "run-bad-flag", "evaluate", "export"],
)
def test_an_error_into_a_closed_pipe_keeps_its_status(
    tmp_path: Path, args: list[str], status: int
) -> None:
    """`2>&1 | head -1`: the error message, on stderr, raised BrokenPipeError once the
    reader had gone, and the command ended with 1 (an uncaught exception) instead of its
    own status."""
    paths = [str(tmp_path / a) if a.startswith(("missing", "w")) else a for a in args]
    result = run_cli_into_a_closed_pipe("-m", *paths, stderr_too=True)
    assert result.returncode == status


def test_a_command_started_with_stdout_closed_runs(tmp_path: Path) -> None:
    """`... >&-` (sys.stdout is None): the closed-pipe handling once flushed it at the end,
    an AttributeError traceback after the command had run."""
    code = (
        "import os, runpy, sys; os.close(1); sys.stdout = None; "
        f"sys.argv = ['training.evaluate', {str(tmp_path / 'none')!r}]; "
        "runpy.run_module('training.evaluate', run_name='__main__')"
    )
    result = run_cli("-c", code)
    assert result.returncode == 2, result.stderr  # the missing model, said on stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
