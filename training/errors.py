"""Errors a user causes and can fix. The CLIs print them as one line, without a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Something about the command line, the data or a file that the user can correct."""


def check_output_file(flag: str, path: Path) -> None:
    """Refuse an output file that cannot be written, before the work whose report it holds."""
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"{flag} {path} must be a file path in an existing folder")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(
            f"{flag} {path} cannot be written (no permission, or a read-only file system)"
        )
