"""Argument types shared by the command lines (training.run, .evaluate, .export, app.client)."""

from __future__ import annotations

import argparse
from pathlib import Path


def path_arg(text: str) -> Path:
    """A path from the command line. An empty one (an unset variable: `--out-dir "$OUT"`) is
    Path(".") to pathlib, and a run or an export then wrote its files into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty path (an unset variable?); give a file or folder"
        )
    return Path(text)
