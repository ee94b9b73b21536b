"""Ctrl-C and SIGTERM while a command line loads PyTorch: a quiet exit, not a traceback.

Raised inside `import torch`, a KeyboardInterrupt ended the process with a traceback from deep
inside torch or NumPy, or with an abort from torch's C++ ('terminate called after throwing an
instance of pybind11::error_already_set'). So each command (training.run, .evaluate, .export,
python -m app) imports its heavy modules inside `stops_held()` and exits with `stop_status`
when a stop arrived meanwhile. This module imports only the standard library.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
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
