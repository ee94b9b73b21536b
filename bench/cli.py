"""What the bench command lines share: argument types, one-line errors, atomic JSON reports.

Bad arguments are refused before any timing starts: a typo found after minutes of GPU time
(or after a notebook baseline was measured) threw the measurement away with a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from training.errors import UserError


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse `type=`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (argparse `type=`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of integers of at least 1, e.g. `1,8,32` (argparse `type=`)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas, e.g. 1,8,32")
    try:
        return [positive_int(p) for p in parts]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def fail(message: str) -> NoReturn:
    """`error: message` on stderr and exit status 2, as argparse and training's CLIs exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A UserError (a missing or foreign checkpoint, CUDA asked for and absent, no data) is
    the user's to fix: one `error:` line, not a traceback."""
    try:
        yield
    except UserError as exc:  # CheckpointError is one
        fail(str(exc))


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as JSON in `path`, whole or not at all: written to a temporary file beside it and
    renamed over it, so a kill or a full disk mid-write leaves the previous report intact."""
    text = json.dumps(obj, indent=1)
    # A fixed name beside the target (not mkstemp's): opened normally, it gets the umask's
    # permissions, as the report written in place did.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
