"""Checkpoints: atomic writes, the background writer, and one-line errors for bad files."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import training.checkpoint as checkpoint_module
from training.artifact import load_for_inference
from training.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriter,
    build_model,
    library_versions,
    load_checkpoint,
    model_section,
    preprocessing_of,
    save_atomic,
    to_cpu,
)
from training.errors import UserError
from training.model import AlexNet, AlexNetConfig
from training.preprocess import Preprocessing


def _small(value: int) -> dict[str, Any]:
    return {"format": FORMAT, "value": value, "tensor": torch.full((64,), float(value))}


def _crash_midway(obj: object, f: IO[bytes], *args: object, **kwargs: object) -> None:
    f.write(b"PK\x03\x04 half a zip file" * 100)  # some bytes reach the temp file...
    raise OSError(28, "No space left on device")  # ...then the disk fills up


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key]


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A minimal valid checkpoint of a 3-class AlexNet (weights only)."""
    torch.manual_seed(0)
    config = AlexNetConfig(num_classes=3)
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_section(to_cpu(AlexNet(config).state_dict()), config),
        "classes": ["a", "b", "c"],
        "preprocessing": Preprocessing().to_dict(),
        "versions": library_versions(),
    }
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_atomic(ckpt, path)
    yield path
    path.unlink()


# ---- atomic writes ----------------------------------------------------------------------------


def test_save_atomic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    save_atomic(_small(1), path)
    save_atomic(_small(2), path)  # replaces
    _assert_same(torch.load(path, weights_only=True), _small(2))
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]


def test_crash_during_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.pt"
    save_atomic(_small(1), path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_module.torch, "save", _crash_midway)
    with pytest.raises(CheckpointError, match="No space left"):
        save_atomic(_small(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    _assert_same(torch.load(path, weights_only=True), _small(1))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temp file left behind


def test_crash_during_first_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_module.torch, "save", _crash_midway)
    with pytest.raises(CheckpointError, match="No space left"):
        save_atomic(_small(1), tmp_path / "last.pt")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_naming_the_file_not_torchs_zip_writer_error(
    tmp_path: Path,
) -> None:
    """torch.save reports a write that fails (disk full, here a file-size limit) as a
    RuntimeError of its zip writer ("unexpected pos ...") on top of the OSError; training
    stopped with that traceback. It is a CheckpointError (a one-line error) naming the file."""
    path = tmp_path / "last.pt"
    save_atomic(_small(1), path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(CheckpointError, match=r"cannot write .*last\.pt: File too large"):
            save_atomic({"format": FORMAT, "tensor": torch.zeros(1 << 20)}, path)  # 4 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _assert_same(torch.load(path, weights_only=True), _small(1))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_writer_writes_in_order(tmp_path: Path) -> None:
    writer = CheckpointWriter()
    for value in range(4):
        writer.submit(_small(value), tmp_path / "last.pt")
        writer.submit(_small(10 + value), tmp_path / f"e{value}.pt")
    writer.close()
    _assert_same(torch.load(tmp_path / "last.pt", weights_only=True), _small(3))
    for value in range(4):
        _assert_same(torch.load(tmp_path / f"e{value}.pt", weights_only=True), _small(10 + value))


def test_writer_surfaces_a_write_error_from_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_atomic(_small(1), tmp_path / "last.pt")
    writer = CheckpointWriter()
    monkeypatch.setattr(checkpoint_module.torch, "save", _crash_midway)
    writer.submit(_small(2), tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="No space left"):
        writer.close()
    monkeypatch.undo()
    _assert_same(torch.load(tmp_path / "last.pt", weights_only=True), _small(1))
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_writer_runs_then_after_the_write_and_not_after_a_failed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`then` (the trainer's metrics.jsonl) follows its checkpoint onto the disk, never ahead."""
    seen: list[tuple[str, bool]] = []

    def then(name: str) -> Any:
        return lambda: seen.append((name, (tmp_path / name).exists()))

    writer = CheckpointWriter()
    writer.submit(_small(1), tmp_path / "a.pt", None, then("a.pt"))
    writer.wait()
    monkeypatch.setattr(checkpoint_module.torch, "save", _crash_midway)
    writer.submit(_small(2), tmp_path / "b.pt", None, then("b.pt"))
    with pytest.raises(CheckpointError, match="No space left"):
        writer.close()
    assert seen == [("a.pt", True)]


def test_writer_surfaces_a_write_error_from_submit_or_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save

    def save_failing_for_a(obj: object, f: IO[bytes], *args: Any, **kwargs: Any) -> None:
        if ".a.pt." in f.name:
            _crash_midway(obj, f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_failing_for_a)
    writer = CheckpointWriter()
    with pytest.raises(CheckpointError, match="No space left"):
        writer.submit(_small(1), tmp_path / "a.pt")
        # Raises here when the failed write already finished; else b.pt is queued behind it,
        # skipped, and wait() raises.
        writer.submit(_small(2), tmp_path / "b.pt")
        writer.wait()
    writer.submit(_small(3), tmp_path / "c.pt")  # reported once; writing goes on
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_a_close_interrupted_by_a_stop_is_finished_by_the_next_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM while the final last.pt (with the test result) is written interrupts
    `close`; the trainer then closes again, deaf to further stops, so that the write reaches
    the disk. On Python 3.11 the second close returned at once (an interrupted Thread.join
    marks the still-running thread as ended): the process exited in the middle of the write,
    and the run's final last.pt was lost."""
    real_save = torch.save
    writing, release = threading.Event(), threading.Event()

    def slow_save(obj: object, f: IO[bytes], *args: Any, **kwargs: Any) -> None:
        writing.set()
        release.wait(30)  # still writing when the stop comes
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", slow_save)
    writer = CheckpointWriter()
    try:
        writer.submit(_small(1), tmp_path / "last.pt")
        assert writing.wait(30)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            writer.close()
        threading.Timer(0.3, release.set).start()
        writer.close()
        assert release.is_set()  # it waited for the write
        _assert_same(torch.load(tmp_path / "last.pt", weights_only=True), _small(1))
        assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    finally:
        release.set()


# ---- loading and validating -------------------------------------------------------------------


def test_valid_checkpoint_loads_and_builds(model_checkpoint: Path) -> None:
    ckpt = load_checkpoint(model_checkpoint)
    assert torch.load(model_checkpoint, weights_only=True)["classes"] == ["a", "b", "c"]
    model = build_model(ckpt)
    assert model.fc3.out_features == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"]["state_dict"][key]), key
    assert preprocessing_of(ckpt) == Preprocessing()
    assert all(isinstance(v, str) for v in ckpt["versions"].values())


def _one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_missing_checkpoint(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.pt", "does not exist")


def test_folder_instead_of_checkpoint(tmp_path: Path) -> None:
    _one_line_error(tmp_path, "is a folder", "last.pt")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    _one_line_error(path, str(path), "not a readable checkpoint")


def test_a_file_torch_did_not_write_is_named_as_such(tmp_path: Path) -> None:
    """A README or a model.json passed as a checkpoint used to be refused for holding
    'pickled Python objects', which it does not."""
    for name, data in (("README.md", b"# notes\n"), ("model.json", b'{"format": 1}')):
        path = tmp_path / name
        path.write_bytes(data)
        message = _one_line_error(path, "torch.save did not write it")
        assert "pickled" not in message


def test_an_exported_model_folder_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{}")
    _one_line_error(tmp_path, "is an exported model folder, not a training checkpoint")


def test_truncated_checkpoint(run_dir: Path, model_checkpoint: Path) -> None:
    path = run_dir / "truncated.pt"
    data = model_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "not a readable checkpoint")


def test_foreign_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    _one_line_error(path, "not an alexnet-serve checkpoint")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"format": FORMAT, "model": AlexNetConfig()}, path)  # needs unpickling a class
    _one_line_error(path, "not a readable checkpoint")


def test_wrong_version_and_architecture(tmp_path: Path) -> None:
    path = tmp_path / "v.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1}, path)
    _one_line_error(path, f"version {FORMAT_VERSION + 1}")
    torch.save(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {"architecture": "resnet"}},
        path,
    )
    _one_line_error(path, "'resnet'")


def test_weights_that_do_not_fit(model_checkpoint: Path) -> None:
    ckpt = load_checkpoint(model_checkpoint)
    ckpt["model"]["args"]["num_classes"] = 10
    with pytest.raises(CheckpointError, match="do not fit the network"):
        build_model(ckpt)
    with pytest.raises(UserError, match="'preprocessing' is unusable"):
        preprocessing_of({"preprocessing": {"source_size": 32}})


def test_writer_waits_for_the_snapshot_copies_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the snapshot's device-to-host copies are asynchronous: the writer must wait on
    the event recorded after them (`ready`) before it reads the tensors."""
    events: list[str] = []

    class Ready:  # a CUDA event's one method the writer uses
        def synchronize(self) -> None:
            events.append("copies done")

    real_save = torch.save

    def save(obj: object, f: IO[bytes], *args: Any, **kwargs: Any) -> None:
        events.append("write")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    writer = CheckpointWriter()
    writer.submit(_small(1), tmp_path / "last.pt", Ready())
    writer.close()
    assert events == ["copies done", "write"]
    _assert_same(torch.load(tmp_path / "last.pt", weights_only=True), _small(1))


def test_served_checksum_is_of_the_bytes_loaded_while_training_replaces_the_file(
    model_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving a running training's last.pt: training renames a new file over it every epoch
    (seconds apart on a GPU). The checksum /model and /health report was computed by reading
    the path again after loading, so a rename in between gave the next epoch's checksum for
    this epoch's weights."""
    path = tmp_path / "last.pt"
    shutil.copyfile(model_checkpoint, path)
    loaded_bytes = hashlib.sha256(path.read_bytes()).hexdigest()
    real_load = torch.load

    def load_then_next_epoch_lands(*args: Any, **kwargs: Any) -> Any:
        result = real_load(*args, **kwargs)
        newer = tmp_path / ".last.pt.tmp"
        newer.write_bytes(b"the next epoch's checkpoint")
        os.replace(newer, path)  # as save_atomic does
        return result

    monkeypatch.setattr(torch, "load", load_then_next_epoch_lands)
    loaded = load_for_inference(path)
    assert loaded.info["sha256"] == loaded_bytes
