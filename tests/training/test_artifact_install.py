"""Installing an export into a folder that may be served: one export at a time, and a kill at
any moment leaves a folder that loads (the old artifact or the new one, never a mix)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import training.artifact as artifact_module
import training.data
import training.engine
import training.export as export_module
from tests.app.support import make_checkpoint
from tests.helpers import folder_locked_by_another_process
from training.artifact import INDEX_NAME, export_artifact, load_for_inference, staged_artifact
from training.errors import UserError


@pytest.fixture(scope="module")
def old() -> dict:
    return make_checkpoint(seed=3)


@pytest.fixture(scope="module")
def new() -> dict:
    return make_checkpoint(seed=4)


def _fc3(folder: Path) -> torch.Tensor:
    return load_for_inference(folder).model.fc3.weight


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the installing code."""


@pytest.mark.parametrize("moves_before_kill", [0, 1, 2, 3, 4, 5])
def test_a_kill_during_install_leaves_the_old_or_the_new_artifact(
    old: dict,
    new: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    moves_before_kill: int,
) -> None:
    """4 shards and then model.json move in (5 renames); then the old shards are removed."""
    out = tmp_path / "w"
    export_artifact(old, out)
    old_fc3 = _fc3(out)
    moves = []
    rename = os.replace

    def replace(src: Path, dst: Path) -> None:
        if len(moves) == moves_before_kill:
            raise Killed
        moves.append(dst)
        rename(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        raise Killed  # after the 5 renames: killed while removing the old shards

    monkeypatch.setattr(artifact_module.os, "replace", replace)
    monkeypatch.setattr(artifact_module.Path, "unlink", unlink)
    monkeypatch.setattr(artifact_module.shutil, "rmtree", lambda *a, **k: None)  # no clean-up
    with pytest.raises(Killed):
        export_artifact(new, out)
    monkeypatch.undo()
    switched = moves_before_kill == 5
    assert torch.equal(_fc3(out), old_fc3) != switched  # the old artifact, or the new one

    export_artifact(new, out)  # the next export tidies up what the killed one left
    assert not torch.equal(_fc3(out), old_fc3)
    names = {p.name for p in out.iterdir()}
    referenced = set(json.loads((out / INDEX_NAME).read_text())["files"])
    assert names == referenced | {INDEX_NAME}, names  # no staging folder, no orphan shard


def test_after_the_switch_the_new_artifact_loads_and_old_shards_go(
    old: dict, new: dict, tmp_path: Path
) -> None:
    out = tmp_path / "w"
    export_artifact(old, out)
    old_shards = {p.name for p in out.glob("*.safetensors")}
    export_artifact(new, out)
    new_shards = {p.name for p in out.glob("*.safetensors")}
    assert not old_shards & new_shards  # each name carries its content's checksum
    assert torch.equal(_fc3(out), load_for_inference(out).model.fc3.weight)


def test_an_export_is_refused_while_another_writes_the_folder(old: dict, tmp_path: Path) -> None:
    out = tmp_path / "w"
    export_artifact(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with (
        folder_locked_by_another_process(out),
        pytest.raises(
            UserError,
            match="being written by another export or a training run; wait for it to end or choose ",
        ),
    ):
        export_artifact(old, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_staging_folder_of_an_export_in_progress_is_not_removed(
    old: dict, tmp_path: Path
) -> None:
    """Staging folders are removed as stale only under the folder's lock: one that a live
    export holds the lock for is in use, and a second export must leave it alone."""
    out = tmp_path / "w"
    export_artifact(old, out)
    live = out / f"{artifact_module.STAGING_PREFIX}l1ve_0ne"  # as tempfile.mkdtemp names them
    live.mkdir()
    (live / artifact_module.STAGING_MARKER).touch()  # as an export marks its own
    (live / "model-00001-of-00001.safetensors").write_bytes(b"being written")
    with folder_locked_by_another_process(out), pytest.raises(UserError, match="being written"):
        export_artifact(old, out)
    assert (live / "model-00001-of-00001.safetensors").read_bytes() == b"being written"
    export_artifact(old, out)  # once that export has ended (killed), its folder is stale
    assert not live.exists()


def test_a_users_own_folder_named_like_staging_is_left_alone(old: dict, tmp_path: Path) -> None:
    """Only the names tempfile gives staging folders are swept: a user's `.export-notes` in
    --out survives every export, and so does what a link named like staging points to (the
    sweep skips links; rmtree, which refuses them, would too, so this half guards against a
    sweep that follows links rather than testing the skip)."""
    out = tmp_path / "w"
    out.mkdir()
    mine = out / f"{artifact_module.STAGING_PREFIX}notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    # A name tempfile could give, but no export's marker in it: it was deleted with its files.
    also_mine = out / f"{artifact_module.STAGING_PREFIX}backup01"
    also_mine.mkdir()
    (also_mine / "notes.txt").write_text("precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / f"{artifact_module.STAGING_PREFIX}abcd1234").symlink_to(elsewhere)
    export_artifact(old, out)
    export_artifact(old, out)
    assert (mine / "todo.txt").read_text() == "mine"
    assert (also_mine / "notes.txt").read_text() == "precious"
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_the_staging_folder_is_inside_out_even_through_a_symlink(old: dict, tmp_path: Path) -> None:
    # A symlinked --out (or a mount point) may sit on another file system than its parent:
    # staging beside it made the final renames fail after the old shards were deleted.
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    export_artifact(old, link)
    with staged_artifact(old, link) as staged:
        assert staged.out_dir.resolve().parent == target.resolve()
    assert load_for_inference(link).classes == old["classes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link"]


def test_a_folder_whose_name_is_not_utf8_exports_and_loads(old: dict, tmp_path: Path) -> None:
    out = tmp_path / os.fsdecode(b"w\xff")
    export_artifact(old, out)
    assert load_for_inference(out).classes == old["classes"]


def test_export_refuses_a_file_as_out_before_any_work(
    old: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ckpt_path = tmp_path / "last.pt"
    torch.save(old, ckpt_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setattr(artifact_module, "_pack", lambda *a: pytest.fail("staged anyway"))
    assert export_module.main([str(ckpt_path), "--out", str(a_file)]) == 2
    assert "cannot write the artifact to" in capsys.readouterr().err


def test_an_export_that_loses_accuracy_is_refused_and_out_kept(
    old: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "w"
    export_artifact(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # The checkpoint scores 50%, the artifact 49.5%: a drop of 0.5 points.
    code = _export_with_test_results(old, tmp_path, monkeypatch, images=200, correct=(100, 99))
    assert code == 2
    assert "loses 0.50 points of test accuracy (> --max-drop 0.2)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_load_that_races_an_export_gets_the_new_model(
    old: dict, new: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server starting while an export installs read the old model.json, then found its
    shards gone: 'missing; restore it or re-export', for a folder that was fine."""
    out = tmp_path / "w"
    export_artifact(old, out)
    verify, raced = artifact_module.verify_files, []

    def export_in_between(folder: Path, index: dict) -> None:
        if not raced:  # between reading model.json and reading the shards it names
            raced.append(True)
            export_artifact(new, out)
        verify(folder, index)

    monkeypatch.setattr(artifact_module, "verify_files", export_in_between)
    loaded = load_for_inference(out)
    monkeypatch.undo()
    assert raced and torch.equal(loaded.model.fc3.weight, _fc3(out))
    assert loaded.info["sha256"] == artifact_module.sha256_file(out / INDEX_NAME)


def test_a_dangling_symlink_as_out_is_named(old: dict, tmp_path: Path) -> None:
    link = tmp_path / "w"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(UserError, match=r"is a symbolic link to .*gone, which does not exist"):
        export_artifact(old, link)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ('{"modelTopology": {}}', "is not a model exported by this project"),
        ("not json", "is not valid JSON; choose another --out (if it is a damaged export"),
        (None, "is a symbolic link to"),
    ],
    ids=["another-format", "not-json", "link-to-nothing"],
)
def test_an_out_folder_with_another_formats_model_is_refused_and_kept(
    old: dict, tmp_path: Path, index: str | None, message: str
) -> None:
    """Another format's model.json and its shards, named as ours are: an export overwrote
    the one and deleted the others (exit 0)."""
    out = tmp_path / "w"
    out.mkdir()
    if index is None:
        (out / INDEX_NAME).symlink_to(tmp_path / "gone.json")
    else:
        (out / INDEX_NAME).write_text(index)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (out / name).write_bytes(b"theirs")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.exists()}
    with pytest.raises(UserError) as refused:
        export_artifact(old, out)
    assert message in str(refused.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.exists()} == before


def test_shards_an_export_killed_at_the_switch_left_go_with_the_next_export(
    old: dict, new: dict, tmp_path: Path
) -> None:
    """Killed after model.json switched, before the old shards went: the shipped weights/ has
    shards named without a checksum, which the next export must still remove (58 MB)."""
    out = tmp_path / "w"
    export_artifact(old, out)
    (out / "model-00001-of-00004.safetensors").write_bytes(b"an older export's shard")
    export_artifact(new, out)
    listed = set(json.loads((out / INDEX_NAME).read_text())["files"])
    assert {p.name for p in out.glob("*.safetensors")} == listed


def test_a_staging_folder_left_without_its_marker_is_swept(old: dict, tmp_path: Path) -> None:
    """Left by an export killed before it wrote the marker, or by a version without one: it
    holds nothing but an export's files (a 15 MB shard)."""
    out = tmp_path / "w"
    export_artifact(old, out)
    for name, content in (("backup01", None), ("5fg293ei", b"shard")):
        folder = out / f"{artifact_module.STAGING_PREFIX}{name}"
        folder.mkdir()
        if content:
            (folder / "model-00001-of-00004.safetensors").write_bytes(content)
    export_artifact(old, out)
    assert not list(out.glob(f"{artifact_module.STAGING_PREFIX}*"))


def _split(n: int) -> training.data.Split:
    return training.data.Split(
        torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    )


def _export_with_test_results(
    ckpt: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    images: int,
    correct: tuple[int, int],
    extra: tuple[str, ...] = (),
) -> int:
    """training.export's main on `ckpt` with test data of `images` images, of which the
    checkpoint gets correct[0] right and the artifact correct[1]."""
    ckpt_path = tmp_path / "last.pt"
    torch.save(ckpt, ckpt_path)
    split = _split(images)
    classes = list(ckpt["classes"])  # the data has the model's classes (checked before staging)
    runs = iter(correct)

    def evaluate_model(loaded, split, classes, **kwargs):
        right = next(runs)
        predictions = torch.ones(images, dtype=torch.long)
        predictions[:right] = 0
        report = {"accuracy": right / images * 100, "images": images, "per_class": {}}
        return {**report, "confusion": []}, predictions

    monkeypatch.setattr(training.data, "load_test_split", lambda *a: (split, classes, None))
    monkeypatch.setattr(training.engine, "evaluate_model", evaluate_model)
    return export_module.main(
        [str(ckpt_path), "--out", str(tmp_path / "w"), "--data-dir", str(tmp_path), *extra]
    )


@pytest.mark.parametrize(
    ("images", "correct"),
    [((500, (500, 499))), ((10_000, (8689, 8669)))],
    ids=["100-99.8", "86.89-86.69"],
)
def test_a_drop_of_exactly_max_drop_is_accepted(
    old: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    images: int,
    correct: tuple[int, int],
) -> None:
    """0.2 points is "at most --max-drop 0.2": the difference of the two percentages came out
    a bit over it (100.0 - 99.8 = 0.20000000000000284), and the export was refused."""
    assert (
        _export_with_test_results(old, tmp_path, monkeypatch, images=images, correct=correct) == 0
    )
    assert "(+0.20 points drop)" in capsys.readouterr().out
    drop = json.loads((tmp_path / "w" / INDEX_NAME).read_text())["export"]["accuracy_drop_points"]
    assert drop == 0.2


def test_the_size_limit_counts_model_json_with_its_test_report(
    old: dict,
    new: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The test report goes into model.json after the first size check (a confusion matrix
    grows with the classes squared): an artifact over the limit with it was installed."""
    out = tmp_path / "w"
    export_artifact(new, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    size = export_artifact(old, tmp_path / "measure").total_bytes
    monkeypatch.setattr(export_module, "TOTAL_LIMIT_BYTES", size + 1)  # until the report is in
    assert _export_with_test_results(old, tmp_path, monkeypatch, images=10, correct=(5, 5)) == 2
    assert f"over {size + 1:,}; {out} left as it was" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("when", ["shards", "model.json with the test report"])
def test_a_full_disk_is_one_line_and_out_kept(
    old: dict,
    new: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    when: str,
) -> None:
    out = tmp_path / "w"
    export_artifact(new, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if when == "shards":
        # Where the bytes go to the disk (safetensors' own writer raised SafetensorError).
        monkeypatch.setattr(artifact_module.Path, "write_bytes", _no_space)
    else:
        import training.report

        monkeypatch.setattr(training.report, "write_text_atomic", _no_space)
    assert _export_with_test_results(old, tmp_path, monkeypatch, images=10, correct=(5, 5)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot write the artifact to {out}: No space left on device; choose another --out"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
