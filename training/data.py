"""Data sources, the notebook's train/validation split, and GPU-side batching and augmentation.

A whole data set is small (60,000 x 3 x 32 x 32 uint8 = 184 MB), so it is decoded once, kept on
the training device as uint8, and every batch is gathered, augmented, resized and normalized
there. No DataLoader workers, no per-image Python in the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import UnidentifiedImageError

from training.cpus import available_cpus
from training.errors import UserError
from training.folders import list_image_folder, resolve_image_root
from training.preprocess import load_image

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images as uint8 [N, 3, H, W] and labels as int64 [N], on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, indices: Sequence[int]) -> Split:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Split(self.images[index], self.labels[index])


@dataclass
class Data:
    train: Split
    valid: Split
    test: Split
    classes: list[str]
    source: str  # where it came from, for the checkpoint and the logs


def split_indices(n: int, valid_size: float = 0.1, seed: int = 1) -> tuple[list[int], list[int]]:
    """The notebook's split: shuffle 0..n-1 with NumPy's legacy seed; the first part validates."""
    indices = list(range(n))
    split = int(np.floor(valid_size * n))
    # RandomState(seed) draws exactly what `np.random.seed(seed); np.random.shuffle(...)` draws,
    # without touching NumPy's global state.
    np.random.RandomState(seed).shuffle(indices)
    return indices[split:], indices[:split]


def load_data(
    data_dir: Path | None,
    download_root: Path,
    *,
    valid_size: float,
    split_seed: int,
    source_size: int = 32,
    while_decoding: Callable[[], None] | None = None,
) -> Data:
    """Load train+test from an image-folder tree, or from torchvision's CIFAR-10 download.

    `while_decoding` runs once during the load: beside the image folders' decoding workers, or
    after the download's arrays are read (there is nothing to overlap)."""
    if data_dir is not None:
        full_train, test, classes = load_image_folder(data_dir, source_size, while_decoding)
        source = f"image folders in {resolve_image_root(data_dir)}"
    else:
        full_train, test, classes = load_cifar10(download_root)
        source = f"torchvision CIFAR-10 in {download_root}"
        if while_decoding is not None:
            while_decoding()
    if len(test) == 0:
        raise UserError(f"no test images found ({source})")
    train_idx, valid_idx = split_indices(len(full_train), valid_size, split_seed)
    if not train_idx or not valid_idx:
        raise UserError(
            f"{len(full_train)} training images cannot be split with --valid-size {valid_size}: "
            "both parts need at least one image"
        )
    return Data(full_train.subset(train_idx), full_train.subset(valid_idx), test, classes, source)


def load_cifar10(root: Path) -> tuple[Split, Split, list[str]]:
    """The official CIFAR-10 through torchvision, downloaded into `root` on first use."""
    from torchvision.datasets import CIFAR10  # deferred: the app never needs it

    existed = root.exists()
    try:
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except Exception as exc:  # URLError, socket errors, a corrupt partial download...
        if not existed:
            with contextlib.suppress(OSError):  # not empty: a partial download, kept
                root.rmdir()  # offline, the attempt left an empty ./data behind
        raise UserError(
            f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}). "
            "Offline? Pass --data-dir DIR, an image-folder tree DIR/train/<class>/*, "
            "DIR/test/<class>/*"
        ) from None

    def to_split(ds: CIFAR10) -> Split:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return Split(images, torch.tensor(ds.targets, dtype=torch.long))

    return to_split(train), to_split(test), list(train.classes)


def _decode_chunk(paths: Sequence[Path], size: int) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """The images, and each file that could not be decoded with why: every file is tried, so
    that the error can say how many there are (a worker's first exception said only one)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    failed: list[tuple[Path, str]] = []
    for i, path in enumerate(paths):
        if _stop is not None and _stop.is_set():
            break  # the parent stopped the decoding and will not read this
        try:
            out[i] = load_image(path, size).numpy()
        except UnidentifiedImageError:  # its message repeats the path
            failed.append((path, "not an image file Pillow can read"))
        except Exception as exc:  # truncated, damaged, too large: PIL's own words
            failed.append((path, str(exc).strip().split("\n")[0] or type(exc).__name__))
    return out, failed


DECODE_CHUNK = 1000  # images per task of the decoding pool
_stop: Any = None  # in a decoding worker: the pool's stop flag (a multiprocessing Event)


def _start_worker(stop: Any) -> None:
    global _stop
    _stop = stop
    _leave_stops_to_the_parent()


def _leave_stops_to_the_parent() -> None:
    """A decoding worker's first act. A terminal's Ctrl-C reaches every process of its group,
    the workers too, and each printed a KeyboardInterrupt traceback (SIGTERM to the group: the
    same, through the handler that training.run sets and fork copies). Ctrl-C is left to the
    parent, which stops them as it does when only it is signalled: the queued chunks are
    cancelled. SIGTERM gets its default action back, a silent exit, not ignored: a worker
    orphaned by a killed parent (the OOM killer) must still yield to `kill`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def decode_images(
    paths: Sequence[Path], size: int, while_decoding: Callable[[], None] | None = None
) -> torch.Tensor:
    """Decode and reduce images to uint8 [N, 3, size, size], on every core; UserError naming
    the first file that cannot be decoded, and how many cannot, before anything trains.

    Processes, not threads: for 32x32 images the per-image Python work, which holds the GIL,
    outweighs the decoding (threads took 39 s for CIFAR-10 on 16 cores; see README).
    `while_decoding`, if given, runs once in this process while the workers decode (or after
    the decoding, when it is too small to need them).
    """
    workers = min(32, available_cpus())
    if workers == 1 or len(paths) <= DECODE_CHUNK:
        images, failed = _decode_chunk(paths, size)
        _refuse_unreadable(failed)
        if while_decoding is not None:
            while_decoding()
        return torch.from_numpy(images)
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    # fork: every worker starts at the first submit, before `while_decoding` may initialize
    # CUDA here, and they only run PIL and NumPy before exiting.
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(stop,)
    ) as pool:
        results = pool.map(_decode_chunk, chunks, [size] * len(chunks))  # all submitted now
        try:
            if while_decoding is not None:
                while_decoding()
            parts = list(results)
        except BaseException:  # an error or Ctrl-C: stop, do not decode on
            # shutdown cancels the queued chunks but waits for the running ones, up to
            # DECODE_CHUNK images each: seconds of silence after Ctrl-C for large photos. The
            # flag has them stop at their next image. (Not SIGTERM: a worker killed while it
            # sent a result left the pool's reader waiting for the rest, for ever.)
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise
    _refuse_unreadable([f for _, chunk_failed in parts for f in chunk_failed])
    return torch.from_numpy(np.concatenate([images for images, _ in parts]))


UNREADABLE_LISTED = 50  # unreadable files named in the log before the error, at most


def _refuse_unreadable(failed: list[tuple[Path, str]]) -> None:
    """UserError naming the first file that could not be decoded, and how many could not; with
    several, each is logged first, so that all can be fixed before the next try (the decoding
    can take minutes)."""
    if not failed:
        return
    path, why = failed[0]
    if len(failed) == 1:
        raise UserError(f"cannot read image {path}: {why}; remove or replace it")
    for other, reason in failed[:UNREADABLE_LISTED]:
        log.warning("unreadable image %s: %s", other, reason)
    if len(failed) > UNREADABLE_LISTED:
        log.warning("... and %d more unreadable images", len(failed) - UNREADABLE_LISTED)
    raise UserError(
        f"cannot read {len(failed)} images (listed above), the first {path}: {why}; remove or "
        "replace them"
    )


def load_image_folder(
    data_dir: Path, size: int = 32, while_decoding: Callable[[], None] | None = None
) -> tuple[Split, Split, list[str]]:
    root = resolve_image_root(data_dir)
    train_paths, train_labels, classes = list_image_folder(root / "train")
    if len(classes) < 2:
        raise UserError(
            f"{root / 'train'} has one class folder ({classes[0]!r}); a classifier needs at "
            f"least two: {root}/train/<class>/<image>, a folder per class"
        )
    test_paths, test_labels, _ = list_image_folder(root / "test", classes)
    log.info("decoding %d + %d images from %s", len(train_paths), len(test_paths), root)
    # One pool for both, so `while_decoding` overlaps all of it.
    images = decode_images(train_paths + test_paths, size, while_decoding)
    n = len(train_paths)
    train = Split(images[:n], torch.tensor(train_labels, dtype=torch.long))
    # A copy: a view would keep the whole decoded set alive for as long as the test images
    # are (the run's length, on a CPU); the training part is copied by its split anyway.
    test = Split(images[n:].clone(), torch.tensor(test_labels, dtype=torch.long))
    return train, test, classes


def load_test_split(
    data_dir: Path | None, download_root: Path, size: int = 32
) -> tuple[Split, list[str], list[str]]:
    """The test split alone: images, class names, and a name per image (test/<class>/<file> for
    image folders, test/<index> for the CIFAR-10 download) to report predictions by."""
    if data_dir is None:
        _, test, classes = load_cifar10(download_root)
        return test, classes, [f"test/{i}" for i in range(len(test))]
    root = resolve_image_root(data_dir, "test")
    paths, labels, classes = list_image_folder(root / "test")
    log.info("decoding %d test images from %s", len(paths), root)
    split = Split(decode_images(paths, size), torch.tensor(labels, dtype=torch.long))
    return split, classes, [p.relative_to(root).as_posix() for p in paths]


# ---- batching and augmentation, on the training device -------------------------------------


def epoch_order(n: int, epoch: int, seed: int, device: torch.device) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) alone, so a resumed run
    and every DDP rank draw the same one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).to(device)


def batch_slices(
    order: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """Index batches of one epoch; the last partial batch is dropped (static shapes for CUDA
    graphs). With DDP, global batch i is split into world_size equal local batches."""
    local = batch_size // world_size
    return [
        order[start + rank * local : start + (rank + 1) * local]
        for start in range(0, len(order) - batch_size + 1, batch_size)
    ]


def crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, as one gather.

    The same as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, batched on the
    device and free of host synchronization (so it can live inside a CUDA graph).
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=device)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    flip = torch.rand(b, 1, device=device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
