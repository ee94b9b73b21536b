"""Errors a user causes and can fix. The CLIs print them as one line, without a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Something about the command line, the data or a file that the user can correct."""


def check_output_file(flag: str, path: Path) -> None:
    """Refuse an output file that cannot be written, before the work whose report it holds."""
    if path.is_symlink():  # the write goes to the file it names (report.write_text_atomic)
        target = Path(os.path.realpath(path))
        if target.is_dir() or not target.parent.is_dir():
            raise UserError(
                f"{flag} {path} is a symbolic link to {target}, which cannot be a file (its "
                "folder is missing, or it is a folder); choose another path"
            )
        path = target
    if path.is_dir() or not path.parent.is_dir():
        raise UserError(f"{flag} {path} must be a file path in an existing folder")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(
            f"{flag} {path} cannot be written (no permission, or a read-only file system)"
        )


def refuse_a_dangling_link(flag: str, folder: Path) -> None:
    """An output folder that is a symbolic link to nothing: named with its missing target
    (creating it said only "File exists")."""
    if folder.is_symlink() and not folder.exists():
        raise UserError(
            f"{folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
            f"create that folder or choose another {flag}"
        )
