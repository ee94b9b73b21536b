"""How a command line ends when it is interrupted: quietly, with the status a shell reports.

- Ctrl-C and SIGTERM while it loads PyTorch. Raised inside `import torch`, a KeyboardInterrupt
  ended the process with a traceback from deep inside torch or NumPy, or with an abort from
  torch's C++ ('terminate called after throwing an instance of pybind11::error_already_set').
  So each command (training.run, .evaluate, .export, python -m app) imports its heavy modules
  inside `stops_held()` and exits with `stop_status` when a stop arrived meanwhile.
- A reader of its output that goes away (`| head`): `exit_status` and `StdoutHandler`.

This module imports only the standard library.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stops_held() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM inside the block are noted in the list it gives, not raised. A signal
    that is ignored (a job started with nohup or &) stays ignored."""
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {
        sig: signal.signal(sig, note)
        for sig in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_status(signum: int) -> int:
    """The exit status of a command stopped by `signum`, as a shell reports it: 130 for Ctrl-C,
    143 for SIGTERM."""
    return 128 + signum


def _drop_stdout() -> None:
    """Point stdout at /dev/null: its reader is gone, and Python's flush at exit would fail
    again, with another traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def exit_status(main: Callable[[], int]) -> int:
    """`main()`'s exit status; when its output's reader went away (`| head -1`), 141, as a
    shell reports a process that SIGPIPE ended, where a BrokenPipeError traceback was printed.
    Files a command writes are written before its report is printed, so none is lost."""
    try:
        status = main()
        sys.stdout.flush()  # the last buffered lines, while the error can still be caught
    except BrokenPipeError:
        _drop_stdout()
        return 128 + signal.SIGPIPE
    return status


class StdoutHandler(logging.StreamHandler):
    """Log lines on stdout, for a long run: when the reader goes away (`| head`), the run goes
    on and its lines are dropped, where each was a 'Logging error' traceback on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _drop_stdout()
            return
        super().handleError(record)
