"""How a command line ends when it is interrupted: quietly, with the status a shell reports.

- Ctrl-C and SIGTERM while it loads PyTorch. Raised inside `import torch`, a KeyboardInterrupt
  ended the process with a traceback from deep inside torch or NumPy, or with an abort from
  torch's C++ ('terminate called after throwing an instance of pybind11::error_already_set').
  So each command (training.run, .evaluate, .export, python -m app) imports its heavy modules
  inside `stops_held()` and exits with `stop_status` when a stop arrived meanwhile.
- A reader of its output that goes away (`| head`, `2>&1 | head`): `exit_status`.

This module imports only the standard library.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


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


class _StreamOutlivingItsReader:
    """sys.stdout or sys.stderr, except that once its reader has gone away (`| head -1`), what
    is written is dropped instead of raising BrokenPipeError."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        """Point the file descriptor at /dev/null: what is still buffered, and what comes
        later, goes there (Python's own flush at exit included)."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def exit_status(main: Callable[[], int]) -> int:
    """`main()`'s exit status, run with a stdout and stderr that outlive their reader: when the
    reader goes away (`| head -1`, `2>&1 | head -1`), the command goes on to its end and its
    later output is dropped. The first print after that used to raise BrokenPipeError: a
    traceback, and an export left uninstalled, an output file unwritten, a failure's status
    lost (an error message on stderr turned status 2 into 1)."""
    # None: started with the stream closed (>&-); print then does nothing.
    if sys.stdout is not None:
        sys.stdout = _StreamOutlivingItsReader(sys.stdout)  # type: ignore[assignment]
    if sys.stderr is not None:
        sys.stderr = _StreamOutlivingItsReader(sys.stderr)  # type: ignore[assignment]
    status = main()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    return status
