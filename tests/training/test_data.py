"""Data sources on generated miniatures in their real on-disk formats, the notebook's split,
clear errors for bad data, and the batching/augmentation helpers."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import training.data as data_module
from tests.helpers import CHANNEL, FORMATS, TreeFactory, class_image, write_image
from training.data import (
    _decode_chunk,
    batch_slices,
    crop_flip,
    decode_images,
    epoch_order,
    load_data,
    load_image_folder,
    load_test_split,
    split_indices,
)
from training.errors import UserError
from training.folders import list_image_folder
from training.preprocess import load_image

# ---- the notebook's train/validation split ----------------------------------------------------


def test_split_reproduces_the_notebook(restore_numpy_rng: None) -> None:
    train, valid = split_indices(50000, 0.1, 1)
    # The notebook, verbatim (it reseeds NumPy's global RNG; the fixture puts it back).
    np.random.seed(1)
    indices = list(range(50000))
    np.random.shuffle(indices)
    assert train == indices[5000:]
    assert valid == indices[:5000]
    # Pinned, so that a NumPy whose legacy shuffle changed is caught even if both sides agree.
    assert valid[:5] == [26247, 35067, 34590, 16668, 12196]
    assert train[:5] == [45573, 39021, 36044, 45885, 19497]
    assert sorted(train + valid) == list(range(50000))


def test_split_does_not_touch_numpys_global_rng(restore_numpy_rng: None) -> None:
    np.random.seed(1234)
    expected = np.random.random(3)
    np.random.seed(1234)
    split_indices(1000, 0.1, 1)
    assert np.array_equal(np.random.random(3), expected)


@pytest.mark.parametrize(
    ("n", "valid_size", "n_valid"), [(10, 0.25, 2), (24, 0.25, 6), (7, 0.5, 3)]
)
def test_split_sizes(n: int, valid_size: float, n_valid: int) -> None:
    train, valid = split_indices(n, valid_size, 1)
    assert len(valid) == n_valid
    assert sorted(train + valid) == list(range(n))
    assert split_indices(n, valid_size, 1) == (train, valid)  # deterministic
    assert split_indices(n, valid_size, 2) != (train, valid)  # the seed matters


# ---- image-folder trees -----------------------------------------------------------------------


def _dominant_channel(image: torch.Tensor) -> int:
    return int(image.float().mean(dim=(1, 2)).argmax())


def test_image_folder_tree_in_mixed_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    written: dict[Path, np.ndarray] = {}
    for split, count in (("train", 5), ("test", 2)):
        for name in ("red", "green", "blue"):
            for j in range(count):
                array = class_image(CHANNEL[name], rng)
                path = write_image(root / split / name / f"img{j}{FORMATS[j % 4]}", array)
                written[path] = array
    # A larger RGBA image is reduced to 32x32; it is still red.
    odd = rng.integers(0, 60, size=(47, 61, 4), dtype=np.uint8)
    odd[..., 0] = 230
    odd[..., 3] = rng.integers(200, 256, size=(47, 61), dtype=np.uint8)
    odd_path = root / "train" / "red" / "odd.png"
    Image.fromarray(odd, mode="RGBA").save(odd_path)
    # Ignored: non-images, hidden files, hidden folders.
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    # Pillow writes PDF only, and only identifies HDF5 (a stub without a decoder).
    (root / "train" / "red" / "notes.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    (root / "train" / "red" / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    write_image(root / "train" / "red" / ".hidden.png", class_image(1, rng))
    write_image(root / "train" / ".ipynb_checkpoints" / "x.png", class_image(1, rng))

    full, test, classes = load_image_folder(root)
    assert classes == ["blue", "green", "red"]  # sorted folder names
    assert full.images.shape == (16, 3, 32, 32) and full.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.uint8
    # Decoded together, but the test images do not hold the training images' memory.
    assert test.images.untyped_storage().nbytes() == test.images.nbytes
    assert full.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 6
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert full.labels.dtype == torch.int64

    # Pixels: exactly as written for lossless formats, as decoded for JPEG; in sorted-path order per class.
    train_paths = [p for c in classes for p in sorted((root / "train" / c).glob("img*"))]
    for k, path in enumerate(train_paths):
        got = full.images[k].permute(1, 2, 0).numpy()
        if path.suffix == ".jpg":  # lossy: what the decoder gives for that file
            with Image.open(path) as image:
                assert np.array_equal(got, np.asarray(image.convert("RGB"))), path
        else:
            assert np.array_equal(got, written[path]), path
    odd_index = 15  # the last red image: odd.png sorts after img0..img4
    assert torch.equal(full.images[odd_index], load_image(odd_path))
    for image, label in zip(
        [*full.images, *test.images], [*full.labels, *test.labels], strict=True
    ):
        assert _dominant_channel(image) == CHANNEL[classes[int(label)]]

    # load_data splits that set with the notebook's rule.
    data = load_data(root, tmp_path / "unused", valid_size=0.25, split_seed=1)
    train_idx, valid_idx = split_indices(16, 0.25, 1)
    assert data.classes == classes
    assert (len(data.train), len(data.valid), len(data.test)) == (12, 4, 6)
    assert torch.equal(data.train.images, full.images[train_idx])
    assert torch.equal(data.train.labels, full.labels[train_idx])
    assert torch.equal(data.valid.images, full.images[valid_idx])
    assert torch.equal(data.valid.labels, full.labels[valid_idx])
    assert torch.equal(data.test.images, test.images)
    assert str(root) in data.source
    assert not (tmp_path / "unused").exists()  # no download attempted


def test_images_in_subfolders_of_a_class_are_its_images(tmp_path: Path) -> None:
    """As torchvision's ImageFolder takes them: they were left out without a word, and a class
    whose images were all in subfolders was refused as holding no images. Hidden folders stay
    out; a symlinked folder counts (as in ImageFolder), but not one to a folder above or one
    already walked (ImageFolder loops forever on the first, counts twice the second)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_image(root / split / "red" / "a.png", class_image(CHANNEL["red"], rng))
        write_image(root / split / "red" / "phone" / "b.png", class_image(CHANNEL["red"], rng))
        write_image(
            root / split / "blue" / "2024" / "06" / "c.png", class_image(CHANNEL["blue"], rng)
        )
    write_image(root / "train" / "red" / ".thumbnails" / "t.png", class_image(1, rng))
    (root / "train" / "red" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "red" / "self").symlink_to(root / "train" / "red", target_is_directory=True)
    (root / "train" / "red" / "again").symlink_to("phone", target_is_directory=True)
    write_image(tmp_path / "more" / "d.png", class_image(CHANNEL["blue"], rng))
    (root / "train" / "blue" / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    paths, labels, classes = list_image_folder(root / "train")
    assert classes == ["blue", "red"]
    names = [p.relative_to(root / "train").as_posix() for p in paths]
    # red/again is red/phone, walked first (subfolders in name order).
    assert names == ["blue/2024/06/c.png", "blue/more/d.png", "red/a.png", "red/again/b.png"]
    assert labels == [0, 0, 1, 1]
    full, test, _ = load_image_folder(root)
    assert (len(full.images), len(test.images)) == (4, 3)


def test_nested_single_top_folder_is_found(image_tree: Path, tmp_path: Path) -> None:
    outer = image_tree.parent  # holds only cifar10/train, cifar10/test
    data = load_data(outer, tmp_path, valid_size=0.25, split_seed=1)
    assert data.classes == ["blue", "green", "red"]
    assert (len(data.train), len(data.valid), len(data.test)) == (18, 6, 6)
    assert str(image_tree) in data.source
    direct = load_data(image_tree, tmp_path, valid_size=0.25, split_seed=1)
    assert torch.equal(direct.train.images, data.train.images)


def test_load_test_split_names_images(image_tree: Path, tmp_path: Path) -> None:
    split, classes, names = load_test_split(image_tree, tmp_path)
    assert classes == ["blue", "green", "red"]
    assert len(split) == len(names) == 6
    assert names[0] == "test/blue/000.png"
    assert torch.equal(split.images[0], load_image(image_tree / names[0]))


# ---- torchvision's CIFAR-10 on-disk format ----------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path: Path, obj: dict[str, Any]) -> str:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return _md5(path)


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network in tests")


def test_cifar10_download_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(3)
    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    names = [f"class{i}" for i in range(10)]
    # Rows as in the real files: 3072 bytes = the R plane (1024, row-major), then G, then B.
    train_rows = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(5)]
    train_labels = [rng.integers(0, 10, 2).tolist() for _ in range(5)]
    test_rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    test_labels = [4, 0, 9]
    train_list = [
        [f"data_batch_{i + 1}", _write_pickle(folder / f"data_batch_{i + 1}", {
            "batch_label": f"training batch {i + 1} of 5", "data": rows, "labels": labels,
            "filenames": [f"img{i}_{j}.png" for j in range(len(labels))],
        })]
        for i, (rows, labels) in enumerate(zip(train_rows, train_labels, strict=True))
    ]  # fmt: skip
    test_list = [["test_batch", _write_pickle(folder / "test_batch",
                                              {"data": test_rows, "labels": test_labels})]]  # fmt: skip
    meta_md5 = _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    # torchvision checks each file's md5 before loading (and download=True skips the download
    # when they match): point it at ours.
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)

    data = load_data(None, tmp_path, valid_size=0.2, split_seed=1)

    assert data.classes == names
    assert "torchvision CIFAR-10" in data.source
    full_rows = np.concatenate(train_rows)
    full_labels = [label for labels in train_labels for label in labels]
    train_idx, valid_idx = split_indices(10, 0.2, 1)
    expected_train = torch.from_numpy(full_rows.reshape(-1, 3, 32, 32))
    assert data.train.images.dtype == torch.uint8
    assert data.train.images.shape == (8, 3, 32, 32)
    assert torch.equal(data.train.images, expected_train[train_idx])
    assert torch.equal(data.valid.images, expected_train[valid_idx])
    assert data.train.labels.tolist() == [full_labels[i] for i in train_idx]
    assert data.valid.labels.tolist() == [full_labels[i] for i in valid_idx]
    assert data.test.labels.tolist() == test_labels
    # The layout, spelled out: channel c of image 0 is bytes c*1024..(c+1)*1024, row-major.
    for c in range(3):
        plane = test_rows[0, c * 1024 : (c + 1) * 1024].reshape(32, 32)
        assert np.array_equal(data.test.images[0, c].numpy(), plane)
    assert data.test.images[1, 0, 0, 1] == test_rows[1, 1]
    assert data.test.images[1, 2, 1, 0] == test_rows[1, 2048 + 32]

    split, classes, image_names = load_test_split(None, tmp_path)
    assert classes == names and image_names == ["test/0", "test/1", "test/2"]
    assert torch.equal(split.images, data.test.images)


def test_offline_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(UserError) as info:
        load_data(None, tmp_path / "cifar", valid_size=0.1, split_seed=1)
    message = str(info.value)
    assert "--data-dir" in message
    assert "URLError" in message and "no network in tests" in message
    assert str(tmp_path / "cifar") in message
    assert "\n" not in message
    assert not (tmp_path / "cifar").exists()  # the attempt left an empty folder behind
    (tmp_path / "cifar").mkdir()  # one the user made: kept
    with pytest.raises(UserError):
        load_data(None, tmp_path / "cifar", valid_size=0.1, split_seed=1)
    assert (tmp_path / "cifar").is_dir()


# ---- errors a user can fix --------------------------------------------------------------------


def _load(data_dir: Path, tmp_path: Path) -> None:
    load_data(data_dir, tmp_path / "unused", valid_size=0.25, split_seed=1)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--data-dir .*nope is not a directory"):
        _load(tmp_path / "nope", tmp_path)


def test_data_dir_without_train(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no train/ folder; expected .*/train/<class>/<image>"):
        _load(tmp_path / "data", tmp_path)


def test_two_candidate_top_folders_are_ambiguous(tmp_path: Path, tree_factory: TreeFactory) -> None:
    tree_factory(tmp_path / "data" / "a", n_train=1, n_test=1)
    tree_factory(tmp_path / "data" / "b", n_train=1, n_test=1)
    with pytest.raises(UserError, match="has no train/ folder"):
        _load(tmp_path / "data", tmp_path)


def test_class_folder_without_images(tmp_path: Path, tree_factory: TreeFactory) -> None:
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1)
    (root / "train" / "purple").mkdir()
    (root / "train" / "purple" / "readme.txt").write_text("nothing to see")
    with pytest.raises(UserError, match=r"train/purple holds no images"):
        _load(root, tmp_path)


def test_test_classes_differ_from_train(tmp_path: Path, tree_factory: TreeFactory) -> None:
    """The message names the classes that differ, not two long lists to compare by eye."""
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1)
    shutil.rmtree(root / "test" / "green")
    tree_factory(root, classes=["purple"], n_train=0, n_test=1)
    with pytest.raises(UserError) as info:
        _load(root, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert f"only in {root / 'test'}: ['purple']" in message
    assert "only in the training set: ['green']" in message


@pytest.mark.parametrize(
    ("train_name", "test_name", "hint"),
    [
        ("caf\u00e9", "cafe\u0301", "differ only in Unicode normalization"),
        ("Cat", "cat", "differ only in letter case"),
    ],
    ids=["nfc-vs-nfd", "case"],
)
def test_class_names_that_look_alike_are_pointed_out(
    tmp_path: Path, tree_factory: TreeFactory, train_name: str, test_name: str, hint: str
) -> None:
    """A folder copied from macOS can carry a decomposed 'é': printed, both names look the same,
    and a message listing the two class lists would show two identical-looking lists."""
    root = tree_factory(tmp_path / "data", classes=["blue", train_name], n_train=2, n_test=0)
    tree_factory(root, classes=["blue", test_name], n_train=0, n_test=1)
    with pytest.raises(UserError) as info:
        _load(root, tmp_path)
    assert hint in str(info.value)
    assert ascii(train_name) in str(info.value) and ascii(test_name) in str(info.value)


def test_one_class_is_refused(tmp_path: Path, tree_factory: TreeFactory) -> None:
    """One class trains to a loss of 0 and 100% accuracy on anything: a mistake, not a model."""
    root = tree_factory(tmp_path / "data", classes=["cat"], n_train=8, n_test=2)
    with pytest.raises(UserError, match=r"has one class folder \('cat'\); a classifier needs"):
        _load(root, tmp_path)


def test_blank_class_folder_name_is_refused(tmp_path: Path, tree_factory: TreeFactory) -> None:
    """The model would train, and then no loader would accept its class names."""
    root = tree_factory(tmp_path / "data", classes=["blue", " "], n_train=2, n_test=1)
    with pytest.raises(UserError, match=r"class folder ' ' in .*train has a blank name"):
        _load(root, tmp_path)


def test_missing_test_folder(tmp_path: Path, tree_factory: TreeFactory) -> None:
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1)
    shutil.rmtree(root / "test")
    with pytest.raises(UserError, match=r"test is missing"):
        _load(root, tmp_path)


def test_corrupt_image_names_the_file(tmp_path: Path, tree_factory: TreeFactory) -> None:
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1)
    bad = root / "train" / "green" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as info:
        _load(root, tmp_path)
    assert f"cannot read image {bad}" in str(info.value)


def test_unreadable_images_stop_loading_with_the_first_name_and_how_many(
    tmp_path: Path, tree_factory: TreeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated JPEG, and text files named like images, in either split: counted over both
    splits, the first (in the order they are read: train before test) named, and what to do."""
    root = tree_factory(tmp_path / "data", n_train=2, n_test=1, formats=(".jpg",))
    whole = (root / "train" / "red" / "000.jpg").read_bytes()
    truncated = root / "train" / "green" / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError) as info:
        _load(root, tmp_path)
    assert re.fullmatch(
        f"cannot read image {re.escape(str(truncated))}: image file is truncated.*; remove or "
        "replace it",
        str(info.value),
    ), str(info.value)

    (root / "train" / "red" / "notes.jpg").write_text("not an image\n")
    (root / "test" / "blue" / "notes.png").write_text("not an image either\n")
    with pytest.raises(UserError) as info, caplog.at_level(logging.WARNING):
        _load(root, tmp_path)
    assert re.fullmatch(
        f"cannot read 3 images \\(listed above\\), the first {re.escape(str(truncated))}: image "
        "file is truncated.*; remove or replace them",
        str(info.value),
    ), str(info.value)
    # Every one is named before the error, so that all can be fixed before the next try.
    listed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unreadable")]
    assert [m.split(": ")[0] for m in listed] == [
        f"unreadable image {truncated}",
        f"unreadable image {root / 'train' / 'red' / 'notes.jpg'}",
        f"unreadable image {root / 'test' / 'blue' / 'notes.png'}",
    ]

    truncated.unlink()
    with pytest.raises(UserError) as info:
        _load(root, tmp_path)
    assert str(info.value) == (
        f"cannot read 2 images (listed above), the first {root / 'train' / 'red' / 'notes.jpg'}: "
        "not an image file Pillow can read; remove or replace them"
    )


def test_a_long_list_of_unreadable_images_is_cut_short_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(data_module, "UNREADABLE_LISTED", 2)
    failed = [(Path(f"/data/train/x/{i}.jpg"), "broken") for i in range(5)]
    with pytest.raises(UserError, match="cannot read 5 images"), caplog.at_level(logging.WARNING):
        data_module._refuse_unreadable(failed)
    assert [r.getMessage() for r in caplog.records] == [
        "unreadable image /data/train/x/0.jpg: broken",
        "unreadable image /data/train/x/1.jpg: broken",
        "... and 3 more unreadable images",
    ]


def test_too_few_images_to_split(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"24 training images cannot be split with --valid-size"):
        load_data(image_tree, tmp_path, valid_size=0.01, split_seed=1)


# ---- batching and augmentation ----------------------------------------------------------------


def test_crop_flip_is_a_shifted_flipped_window_of_the_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    padding = 4
    out = crop_flip(images, padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (padding,) * 4)
    seen: set[tuple[int, int, bool]] = set()
    for b in range(len(images)):
        matches = []
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                window = padded[b, :, dy : dy + 32, dx : dx + 32]
                for flip in (False, True):
                    if torch.equal(out[b], window.flip(-1) if flip else window):
                        matches.append((dy, dx, flip))
        assert len(matches) == 1, (b, matches)  # random pixels: exactly one window fits
        seen.add(matches[0])
    # Random per image: both flips and many offsets occur in 48 draws.
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10
    # Reproducible from the global torch seed (resume and DDP rely on this).
    torch.manual_seed(5)
    first = crop_flip(images, padding)
    torch.manual_seed(5)
    assert torch.equal(crop_flip(images, padding), first)


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    cpu = torch.device("cpu")
    order = epoch_order(20, 3, 0, cpu)
    assert sorted(order.tolist()) == list(range(20))
    assert torch.equal(epoch_order(20, 3, 0, cpu), order)
    assert not torch.equal(epoch_order(20, 4, 0, cpu), order)
    assert not torch.equal(epoch_order(20, 3, 1, cpu), order)


def test_batch_slices_drop_the_partial_batch_and_split_over_ranks() -> None:
    order = torch.arange(20)
    single = batch_slices(order, 8)
    assert [b.tolist() for b in single] == [list(range(8)), list(range(8, 16))]
    rank0, rank1 = batch_slices(order, 8, 0, 2), batch_slices(order, 8, 1, 2)
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        assert len(a) == len(b) == 4
        assert torch.equal(torch.cat([a, b]), whole)


def test_while_decoding_runs_once_beside_the_decoding_workers(
    tmp_path: Path, tree_factory: TreeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's GPU warm-up runs here: once, in this process, while worker processes
    decode (with one CPU there are none, and it runs after the decoding)."""
    root = tree_factory(tmp_path / "data", n_train=4, n_test=2, formats=(".png",))
    paths, _, _ = list_image_folder(root / "train")
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 3)  # 12 images: 4 tasks for the pool
    seen: list[int] = []

    def beside() -> None:
        seen.append(len(multiprocessing.active_children()))

    images = decode_images(paths, 32, beside)
    assert len(seen) == 1
    if data_module.available_cpus() > 1:
        assert seen[0] > 0  # the workers were alive while it ran
    assert torch.equal(images, torch.stack([load_image(p) for p in paths]))

    # Through load_data (train and test in one pool), and for a folder too small for a pool.
    seen.clear()
    data = load_data(
        root, tmp_path / "unused", valid_size=0.25, split_seed=1, while_decoding=beside
    )
    assert len(seen) == 1 and len(data.train) + len(data.valid) == 12 and len(data.test) == 6
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 1000)
    decode_images(paths, 32, beside)
    assert len(seen) == 2


def _decode_and_mark(paths: list[Path], size: int) -> tuple[np.ndarray, list[Any]]:
    """A decoding task that leaves a file behind, to count the tasks that ran."""
    marks = paths[0].parent.parent.parent / "marks"
    (marks / f"{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.01)  # long enough that the pool cannot finish before the error arrives
    return _decode_chunk(paths, size)


def test_an_error_while_decoding_stops_the_workers_and_propagates(
    tmp_path: Path, tree_factory: TreeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree_factory(tmp_path / "data", n_train=4, n_test=1, formats=(".png",))
    (tmp_path / "data" / "marks").mkdir()
    paths, _, _ = list_image_folder(root / "train")
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 1)
    monkeypatch.setattr(data_module, "_decode_chunk", _decode_and_mark)  # forked workers see it
    if data_module.available_cpus() == 1:
        pytest.skip("one CPU: no decoding workers")

    def fails() -> None:
        raise KeyboardInterrupt  # Ctrl-C during the warm-up

    with pytest.raises(KeyboardInterrupt):
        decode_images(paths * 100, 32, fails)
    assert not multiprocessing.active_children()
    ran = len(list((tmp_path / "data" / "marks").iterdir()))
    assert 0 < ran < 1200  # the queued tasks were cancelled, not decoded before raising


def _load_slowly(path: Path, size: int) -> torch.Tensor:
    """An image as slow to decode as a large photo; each leaves a mark as it starts."""
    marks = path.parent.parent.parent / "marks"
    (marks / f"{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.5)
    return load_image(path, size)


def test_ctrl_c_while_decoding_ends_the_chunks_in_progress_too(
    tmp_path: Path,
    tree_factory: TreeFactory,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The queued chunks were cancelled, but the running ones decoded to their end: with
    1,000 large photos a chunk, Ctrl-C took effect seconds to minutes later, without a word.
    Each worker now stops at its next image."""
    root = tree_factory(tmp_path / "data", n_train=4, n_test=1, formats=(".png",))
    marks = tmp_path / "data" / "marks"
    marks.mkdir()
    paths, _, _ = list_image_folder(root / "train")
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 6)  # 12 images: a chunk per worker
    monkeypatch.setattr(data_module, "load_image", _load_slowly)  # forked workers see it
    if data_module.available_cpus() == 1:
        pytest.skip("one CPU: no decoding workers")

    def ctrl_c_once_they_decode() -> None:
        while not any(marks.iterdir()):
            time.sleep(0.05)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_images(paths, 32, ctrl_c_once_they_decode)
    assert not multiprocessing.active_children()
    # Each worker finished the image it was on, and perhaps began one more as the flag was
    # set; the two chunks to their end are 12.
    assert 1 <= len(list(marks.iterdir())) <= 4
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_sent_to_the_workers_too_is_one_stop_without_their_tracebacks(
    sig: int,
    tmp_path: Path,
    tree_factory: TreeFactory,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A terminal's Ctrl-C (or a SIGTERM to the process group) reaches the decoding workers as
    well as the training process: each worker printed a KeyboardInterrupt traceback beside the
    run's own quiet stop."""
    from training.run import _terminate  # what training.run handles SIGTERM with; fork copies it

    root = tree_factory(tmp_path / "data", n_train=4, n_test=1, formats=(".png",))
    paths, _, _ = list_image_folder(root / "train")
    monkeypatch.setattr(data_module, "DECODE_CHUNK", 3)  # 12 images: 4 tasks for the pool
    if data_module.available_cpus() == 1:
        pytest.skip("one CPU: no decoding workers")
    previous = signal.signal(signal.SIGTERM, _terminate)

    def stop_everyone() -> None:
        # The tasks are done by now: the workers wait for the next one, where the signal hit
        # them outside any task (in a task, the pool hands the exception back quietly).
        time.sleep(0.5)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, sig)  # type: ignore[arg-type]
        time.sleep(0.3)  # they have had it
        raise KeyboardInterrupt  # this process's share of it

    try:
        with pytest.raises(KeyboardInterrupt):
            decode_images(paths, 32, stop_everyone)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not multiprocessing.active_children()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def _worker_that_waits() -> None:
    data_module._leave_stops_to_the_parent()
    time.sleep(30)


def test_a_decoding_worker_ignores_ctrl_c_but_still_yields_to_kill() -> None:
    """An orphaned worker (its parent killed by the OOM killer) must not outlive a plain kill."""
    worker = multiprocessing.get_context("fork").Process(target=_worker_that_waits)
    worker.start()
    try:
        time.sleep(0.5)  # its initializer has run
        os.kill(worker.pid, signal.SIGINT)  # type: ignore[arg-type]
        worker.join(0.5)
        assert worker.is_alive()
        os.kill(worker.pid, signal.SIGTERM)  # type: ignore[arg-type]
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        worker.kill()
        worker.join()


@pytest.mark.slow
def test_large_folder_decodes_in_worker_processes(
    tmp_path: Path, tree_factory: TreeFactory
) -> None:
    # Over 1000 images: decode_images splits them over a process pool (1000 per chunk).
    root = tree_factory(tmp_path / "data", n_train=340, n_test=1, formats=(".png", ".bmp"))
    paths, labels, _ = list_image_folder(root / "train")
    assert len(paths) == 1020
    images = decode_images(paths, 32)
    assert images.shape == (1020, 3, 32, 32) and images.dtype == torch.uint8
    for i in (0, 339, 340, 999, 1000, 1019):  # both chunks, both sides of the boundary
        assert torch.equal(images[i], load_image(paths[i])), i
    for image, label in zip(images, labels, strict=True):
        assert _dominant_channel(image) == CHANNEL[("blue", "green", "red")[label]]
    # An unreadable file in the second chunk is still a clear error naming it.
    bad = root / "train" / "red" / "zzz.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        load_data(root, tmp_path / "unused", valid_size=0.1, split_seed=1)
    # Unreadable files in several chunks are counted together, the first named.
    first = root / "train" / "blue" / "000a.png"
    first.write_text("not an image")
    with pytest.raises(
        UserError, match=rf"cannot read 2 images \(listed above\), the first {first}: "
    ):
        load_data(root, tmp_path / "unused", valid_size=0.1, split_seed=1)
