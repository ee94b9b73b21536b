"""One writer per folder: an advisory lock on the folder itself.

Two processes writing one folder (a run resumed twice at once, a new run pointed at a folder
whose first run has not written last.pt yet, two exports to the same --out) would overwrite
each other's files in turn. The lock is the kernel's (flock, on the folder's own descriptor, so
no lock file is left behind): it goes with the process, however it ends, so a killed writer
never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from training.errors import UserError


@contextmanager
def folder_lock(folder: Path, busy: str) -> Iterator[None]:
    """Hold `folder`'s lock, or raise UserError(`busy`) if another process holds it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def run_lock(out_dir: Path, resuming: bool = False) -> AbstractContextManager[None]:
    """The run folder's lock, held by one training process."""
    # A resumed run continues in its own folder: no other to choose.
    way_on = "wait for it to end" if resuming else "wait for it to end or choose another --out-dir"
    return folder_lock(out_dir, f"{out_dir} is in use by another training process; {way_on}")
