"""What the bench command lines share: argument types, one-line errors, atomic JSON reports.

Bad arguments are refused before any timing starts: a typo found after minutes of GPU time
(or after a notebook baseline was measured) threw the measurement away with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from training.errors import UserError
from training.report import write_text_atomic


def _int_at_least(text: str, low: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be {words}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse `type=`)."""
    return _int_at_least(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (argparse `type=`)."""
    return _int_at_least(text, 0, "0 or more")


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
    """`obj` as JSON in `path`, whole or not at all (training.report.write_text_atomic): a
    kill or a full disk mid-write leaves the previous report intact."""
    write_text_atomic(path, json.dumps(obj, indent=1))
