"""Test helpers: tiny generated image data in real on-disk formats, and running the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.recipes import TrainConfig, make_config

ROOT = Path(__file__).resolve().parent.parent

# Default classes of the generated trees. Sorted folder order is blue, green, red, so the labels
# are blue=0, green=1, red=2, and each class is the colour its name says (dominant channel).
CLASSES = ("red", "green", "blue")
CHANNEL = {"red": 0, "green": 1, "blue": 2}
FORMATS = (".png", ".jpg", ".bmp", ".webp")

TreeFactory = Callable[..., Path]

# `python -c STOP_WHEN_IMPORTED SIGNAL NAME MODULE ARGS...` runs `python -m MODULE ARGS...` and
# sends itself SIGNAL the moment `import NAME` starts: a Ctrl-C (or SIGTERM) at that moment of
# a command's start, e.g. while PyTorch loads. Ctrl-C is made to raise KeyboardInterrupt first,
# as at a terminal: a test run started in the background (`pytest &`) inherits it ignored.
STOP_WHEN_IMPORTED = """
import os, runpy, signal, sys

SIGNAL, NAME, MODULE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
signal.signal(signal.SIGINT, signal.default_int_handler)

class StopWhenImported:
    def find_spec(self, name, path=None, target=None):
        if name == NAME:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), SIGNAL)
        return None

sys.meta_path.insert(0, StopWhenImported())
sys.argv = [MODULE, *sys.argv[4:]]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
"""


def class_image(
    channel: int, rng: np.random.Generator, size: tuple[int, int] = (32, 32)
) -> np.ndarray:
    """An RGB uint8 image [h, w, 3] whose `channel` clearly dominates: dark noise everywhere,
    that channel bright, and a random darker square so that no two images are alike."""
    w, h = size
    image = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    image[..., channel] = rng.integers(170, 256, size=(h, w), dtype=np.uint8)
    y, x = rng.integers(0, max(1, h - 8)), rng.integers(0, max(1, w - 8))
    image[y : y + 8, x : x + 8, channel] //= 2
    return image


def write_image(path: Path, array: np.ndarray) -> Path:
    """Save an RGB array in the format its suffix names (lossless where the format allows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode="RGB")
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    elif path.suffix == ".webp":
        image.save(path, lossless=True)
    else:
        image.save(path)
    return path


def make_image_tree(
    root: Path,
    *,
    classes: Sequence[str] = CLASSES,
    n_train: int = 8,
    n_test: int = 2,
    formats: Sequence[str] = FORMATS,
    seed: int = 0,
) -> Path:
    """root/train/<class>/NNN.<fmt> and root/test/<class>/NNN.<fmt>, 32x32 RGB, formats cycled."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("test", n_test)):
        for index, name in enumerate(classes):
            channel = CHANNEL.get(name, index % 3)
            for j in range(count):
                fmt = formats[j % len(formats)]
                write_image(root / split / name / f"{j:03d}{fmt}", class_image(channel, rng))
    return root


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m training.run` subprocesses: the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(
    *args: str | os.PathLike[str],
    timeout: float = 120,
    env: dict[str, str] | None = None,
    stdout: int = subprocess.PIPE,
    stderr: int = subprocess.PIPE,
) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS...` from the repository root; text output captured (stdout and
    stderr: unless `stdout`/`stderr` name another file descriptor). On a timeout the whole
    process group goes (torchrun's workers too), then the timeout is raised."""
    command = [sys.executable, *map(str, args)]
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env or cli_env(),
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out or "", err or "")


def run_cli_into_a_closed_pipe(
    *args: str | os.PathLike[str], timeout: float = 120, stderr_too: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `python ARGS...` with stdout a pipe whose reader has gone, as in `... | head -1`
    once head has its line: every write to stdout fails (EPIPE). stderr is captured, or with
    `stderr_too` goes into the same pipe (`2>&1 | head -1`). `env`: variables added to the
    environment."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader left: the writer's end may stay open here meanwhile
    try:
        return run_cli(
            *args,
            timeout=timeout,
            env=cli_env(**env),
            stdout=write_end,
            stderr=write_end if stderr_too else subprocess.PIPE,
        )
    finally:
        os.close(write_end)


def tiny_config(recipe: str, data_dir: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    """A run that takes seconds on a CPU: 2 epochs of 2 steps of 8 images (on `image_tree`'s
    24 training images, 6 held out for validation)."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "epochs": 2,
        "batch_size": 8,
        "valid_size": 0.25,
        "eval_batch_size": 16,
        "out_dir": out_dir,
        "device": "cpu",
        **overrides,
    }
    return make_config(recipe, **values)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, and stderr exactly one `error: ...` line naming `fragments`; no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_a_cut_short_report_keeps_the_last(
    out: Path, monkeypatch: Any, write_the_report: Callable[[], object]
) -> None:
    """`write_the_report()` writes JSON to `out`; a disk that fills halfway through the write
    (OSError) must leave the previous report whole and no temporary file beside it."""
    import json

    import pytest

    out.write_text('{"rows": ["the previous run"]}')
    real_write_text = Path.write_text

    def cut_short(self: Path, text: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="No space left"):
        write_the_report()
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"rows": ["the previous run"]}
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


# Class names for the per-class listings of the command lines: one longer than the 12
# characters they were once padded to, and short ones.
LONG_CLASS_NAMES = {"cat": 50.0, "a-rather-long-class-name": 100.0, "dog": 7.5}
SHORT_CLASS_NAMES = {"cat": 50.0, "dog": 7.5}


def assert_per_class_column(stdout: str, per_class: dict[str, float]) -> None:
    """`stdout` lists `per_class`, one '  name  acc%' line each, in order, with the percentages
    in one column: each name padded to the longest, and to 12 characters at least."""
    lines = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in lines] == list(per_class), stdout
    width = max(12, *map(len, per_class))
    for line, (name, acc) in zip(lines, per_class.items(), strict=True):
        assert line == f"  {name.ljust(width)} {acc:6.2f}%", stdout


@contextmanager
def folder_locked_by_another_process(folder: Path) -> Iterator[None]:
    """Another process holds `folder`'s lock (a flock on the folder) until the block ends, as
    a concurrent training run or export would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, time\n"
            f"fd = os.open({str(folder)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(300)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
