"""Fixtures of the training tests: one tiny real training run, shared by several tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import tiny_config
from training.trainer import RunResult, train


@pytest.fixture(scope="session")
def seed_run(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunResult]:
    """The notebook's recipe for 2 epochs on the generated tree (its files are read-only)."""
    out_dir = tmp_path_factory.mktemp("seed-run") / "run"
    yield train(tiny_config("seed", image_tree, out_dir))
    shutil.rmtree(out_dir, ignore_errors=True)  # ~0.7 GB of checkpoints


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder for a training run's output, deleted afterwards (checkpoints are large)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
