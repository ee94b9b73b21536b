"""One training process per run folder: an advisory lock on the folder itself.

Two processes writing one folder (a run resumed twice at once, or a new run pointed at a folder
whose first run has not written last.pt yet) would overwrite each other's checkpoints in turn.
The lock is the kernel's (flock, on the folder's own descriptor, so no lock file is left in the
run): it goes with the process, however it ends, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.errors import UserError


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock, or a one-line error if another process holds it."""
    fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{out_dir} is in use by another training process; wait for it to end or "
                "choose another --out-dir"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock
