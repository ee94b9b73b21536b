"""The bench command lines refuse bad arguments, checkpoints, devices and data with one
`error:` line and status 2 (as argparse does), never a traceback, and before any timing.
(model_alone's missing checkpoint, said by its timing process, is in tests/app/test_bench.py.)"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench import block_order, bn_modes, model_alone, request_path, serve_load, train_speed

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (main, argv); {missing} is a path that does not exist, {foreign} a file that is no
# checkpoint, {tree} an image-folder tree.
CASES: list[tuple[str, Callable[[list[str]], int], list[str]]] = [
    ("bn_modes missing checkpoint", bn_modes.main, ["{missing}", "--device", "cpu"]),
    ("bn_modes foreign checkpoint", bn_modes.main, ["{foreign}", "--device", "cpu"]),
    ("bn_modes cuda", bn_modes.main, ["{foreign}", "--device", "cuda"]),
    ("train_speed cuda", train_speed.main, ["--data-dir", "{tree}", "--device", "cuda"]),
    ("train_speed no data", train_speed.main, ["--data-dir", "{missing}", "--device", "cpu"]),
    ("block_order batches", block_order.main, ["--batches", "abc"]),
    ("block_order rounds", block_order.main, ["--rounds", "0"]),
    ("block_order checkpoint", block_order.main, ["--checkpoint", "{missing}"]),
    ("model_alone batches", model_alone.main, ["--batches", "abc"]),
    ("model_alone procs", model_alone.main, ["--procs", "0"]),
    ("serve_load concurrency", serve_load.main, ["--concurrency", "abc"]),
    ("serve_load rounds", serve_load.main, ["--rounds", "0"]),
    ("serve_load workers", serve_load.main, ["--workers", "1,0"]),
    ("request_path cycles", request_path.main, ["--cycles", "0"]),
    ("request_path checkpoint", request_path.main, ["--checkpoint", "{missing}"]),
]


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        pytest.param(main, argv, id=name, marks=[NO_CUDA] if "cuda" in name else [])
        for name, main, argv in CASES
    ],
)
def test_a_bad_command_line_is_one_error_line(
    main: Callable[[list[str]], int],
    argv: list[str],
    image_tree: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint")
    paths = {"missing": str(tmp_path / "missing"), "foreign": str(foreign), "tree": str(image_tree)}
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**paths) for a in argv])
    assert exit_.value.code == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert "Traceback" not in err
    # Nor a logged error before it (request_path's missing checkpoint: the service's log line,
    # then ours), which pytest takes from stderr.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
