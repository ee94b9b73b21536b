"""Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), written atomically.

A checkpoint is the contract between training and the app: weights plus everything needed to
use them (model arguments, class names, preprocessing, recipe, measured accuracy). It loads
with `torch.load(weights_only=True)`, so opening one never runs pickled code.

Writes go to a temporary file in the same folder, are fsynced, then `os.replace`d over the old
file: a process killed at any moment leaves either the old checkpoint or the new one, never a
torn one. `CheckpointWriter` does this on a background thread so the GPU keeps training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import queue
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.errors import UserError
from training.metadata import MetadataError, model_config
from training.model import ARCHITECTURE, AlexNet, AlexNetConfig
from training.preprocess import Preprocessing

log = logging.getLogger(__name__)

FORMAT = "alexnet-serve/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, foreign or incompatible."""


def library_versions() -> dict[str, str]:
    import numpy
    import PIL
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion object, which weights_only refuses
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
        "pillow": str(PIL.__version__),
    }


def to_cpu(obj: Any, non_blocking: bool = False) -> Any:
    """A deep copy of plain data with every tensor copied to the CPU (a stable snapshot).

    With `non_blocking`, CUDA tensors are copied into pinned memory asynchronously, ordered on
    the current stream before any later training step; wait on an event recorded after this
    call before reading them (`CheckpointWriter.submit(..., ready=event)` does).
    """
    if isinstance(obj, torch.Tensor):
        if non_blocking and obj.is_cuda:
            out = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return out.copy_(obj.detach(), non_blocking=True)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v, non_blocking) for v in obj)
    return obj


def half_written(folder: Path) -> list[Path]:
    """The temp files `save_atomic` leaves in `folder` when its process is killed mid-write
    (up to a checkpoint's size each), sorted."""
    return sorted(folder.glob(".*.pt.*.tmp"))


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as exc:
        # A full disk: torch.save's OSError comes wrapped in a RuntimeError from its zip
        # writer ("unexpected pos ..."), a traceback that never says what went wrong.
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise CheckpointError(
            f"cannot write {path}: {cause.strerror or cause}; {path} was left as it was"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The OSError that `exc` is, or that caused it (torch re-raises I/O errors as others)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a power cut after this keeps the new names)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A queued write: the object, its path, a CUDA event to await first, what to do once written.
_Job = tuple[dict[str, Any], Path, Any, Callable[[], None] | None]


class CheckpointWriter:
    """Writes checkpoints on one background thread, in order, at most one waiting.

    `submit` hands over a CPU snapshot and returns at once (unless a previous write is still
    queued, which bounds memory). `close` waits for everything; an error in a write is raised
    from the next `submit` or from `close`, never lost.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._closing = False
        # Set by the thread itself as it ends. Not `Thread.join`/`is_alive`: on Python 3.11 a
        # join interrupted by Ctrl-C or SIGTERM marks the thread as ended while it still runs
        # (bpo-45274's fix), so the second `close` that `stopped` makes returned at once and
        # the process exited in the middle of the final last.pt.
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                obj, path, ready, then = item
                try:
                    if self._error is None:
                        if ready is not None:
                            ready.synchronize()  # the snapshot's device-to-host copies are done
                        save_atomic(obj, path)
                        if then is not None:
                            then()
                except BaseException as exc:  # surfaced in the training thread
                    self._error = exc
                finally:
                    self._queue.task_done()
            self._queue.task_done()
        finally:
            self._ended.set()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(
        self,
        obj: dict[str, Any],
        path: Path,
        ready: Any = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Queue `obj` for writing to `path`; `ready` (a CUDA event) is awaited first, and
        `then` runs on the writer's thread once `path` is in place (not if the write failed)."""
        self._raise_pending()
        self._queue.put((obj, path, ready, then))

    def wait(self) -> None:
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Write everything queued, then end the thread. May be called again after a Ctrl-C
        interrupted it: the second call waits for the writes the first one was waiting for."""
        if not self._closing and not self._ended.is_set():
            self._queue.put(None)  # a second None (put before an interruption) is harmless
            self._closing = True
        self._ended.wait()
        self._raise_pending()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a training checkpoint; every failure is a one-line CheckpointError."""
    return load_checkpoint_and_digest(path, map_location, digest=False)[0]


def load_checkpoint_and_digest(
    path: Path, map_location: str | torch.device = "cpu", *, digest: bool = True
) -> tuple[dict[str, Any], str | None]:
    """`load_checkpoint`, and the sha256 of the very bytes loaded. Both come from one open
    file: a running training renames a new last.pt over the path every epoch, and hashing the
    path again after loading could describe the next epoch's file, not the weights served."""
    path = Path(path)
    if not path.exists():
        # A relative default (the app's weights/) read from another folder: say where we looked.
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise CheckpointError(f"checkpoint {path} does not exist{where}; check the path")
    if path.is_dir():
        if (path / "model.json").is_file():  # artifact.INDEX_NAME (artifact imports this module)
            raise CheckpointError(
                f"{path} is an exported model folder, not a training checkpoint; pass a "
                "checkpoint file that training wrote (a run's last.pt)"
            )
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file such as {path}/last.pt")
    if not _looks_like_torch_save(path):  # a README, an image, a model.json: say so plainly
        raise CheckpointError(
            f"{path} is not a readable checkpoint: torch.save did not write it; pass a last.pt "
            "or best.pt written by python -m training.run"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before it refuses; the error says it all
            with open(path, "rb") as f:
                ckpt = torch.load(f, map_location=map_location, weights_only=True)
                checksum = _sha256_of(f) if digest else None
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:  # torch's long refusal: name the object
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            reason = "it holds pickled Python objects, which are never loaded" + (
                f" ({found.group(1)})" if found else ""
            )
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            reason = re.split(r"(?<=\.) ", (lines or [type(exc).__name__])[0])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt or foreign): {reason}"
        ) from None
    check_header(
        ckpt, path, FORMAT, FORMAT_VERSION, what="checkpoint",
        hint="pass a last.pt or best.pt written by python -m training.run",
    )  # fmt: skip
    return ckpt, checksum


def _sha256_of(f: Any) -> str:
    f.seek(0)
    sha = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        sha.update(chunk)
    return sha.hexdigest()


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (or, before PyTorch 1.6, a pickle stream); a file that
    is neither would only meet a misleading refusal inside torch.load."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let torch.load report it
    return head.startswith((b"PK\x03\x04", b"\x80"))


def check_header(data: Any, path: Path, fmt: str, version: int, *, what: str, hint: str) -> None:
    """The format marker, format version and architecture that both file formats carry."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise CheckpointError(
            f"{path} is not an alexnet-serve {what} (no '{fmt}' format marker); {hint}"
        )
    if data.get("format_version") != version:
        raise CheckpointError(
            f"{path} has format version {data.get('format_version')}, this code reads version {version}"
        )
    model = data.get("model")
    architecture = model.get("architecture") if isinstance(model, dict) else None
    if architecture != ARCHITECTURE:
        raise CheckpointError(
            f"{path} holds architecture {architecture!r}, expected {ARCHITECTURE!r}"
        )


def build_model(ckpt: dict[str, Any]) -> AlexNet:
    """Rebuild the network from a checkpoint's model section and load its weights (strict)."""
    try:
        model = AlexNet(model_config(ckpt["model"]))
    except MetadataError as exc:
        raise CheckpointError(f"the checkpoint's {exc}") from None
    load_weights(model, state_dict_of(ckpt), "checkpoint")
    return model


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = ckpt["model"].get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError("the checkpoint holds no weights (model.state_dict)")
    return state


def load_weights(model: AlexNet, state: dict[str, torch.Tensor], where: Any) -> None:
    """`model.load_state_dict(state)` (strict); a mismatch is one line naming the tensors."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # torch lists one problem per line: keep them, on one line, within reason.
        problems = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        problems = problems or str(exc)
        if len(problems) > 300:
            problems = problems[:300] + " ..."
        raise CheckpointError(f"{where}: the weights do not fit the network: {problems}") from None


def model_section(state_dict: dict[str, torch.Tensor], config: AlexNetConfig) -> dict[str, Any]:
    return {"architecture": ARCHITECTURE, "args": config.to_dict(), "state_dict": state_dict}


def preprocessing_of(ckpt: dict[str, Any]) -> Preprocessing:
    try:
        return Preprocessing.from_dict(ckpt["preprocessing"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"'preprocessing' is unusable: {exc}") from None
