"""One training process per run folder: an advisory lock on `<run>/.lock`.

Two processes writing one folder (a run resumed twice at once, or a new run pointed at a folder
whose first run has not written last.pt yet) would overwrite each other's checkpoints in turn.
The lock is the kernel's (flock): it goes with the process, however it ends, so a killed run
never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.errors import UserError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock, or a one-line error if another process holds it."""
    path = out_dir / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(
                f"{out_dir} is in use by another training process (pid {holder}); wait for it "
                "to end or choose another --out-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
