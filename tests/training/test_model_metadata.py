"""A damaged or hand-edited model file is refused at load with one CheckpointError naming what
is wrong: never a traceback at start-up, and never a model that then answers 500s."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.app.support import make_checkpoint
from training.artifact import INDEX_NAME, export_artifact, load_for_inference
from training.checkpoint import CheckpointError
from training.errors import UserError
from training.export import main as export_main
from training.folders import list_image_folder


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return make_checkpoint(seed=5)


@pytest.fixture(scope="module")
def artifact(ckpt: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "w"
    export_artifact(ckpt, out)
    return out


def _first(d: dict) -> Any:
    return next(iter(d))


def _set(*path: Any, to: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path
        for key in parents:
            data = data[_first(data) if key is _first else key]
        data[_first(data) if last is _first else last] = to

    return edit


def _drop(*path: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path
        for key in parents:
            data = data[_first(data) if key is _first else key]
        del data[_first(data) if last is _first else last]

    return edit


# Edits either file format can carry (the metadata both share).
SHARED_EDITS = {
    "classes-null": (_set("classes", to=None), "'classes' is missing"),
    "classes-a-string": (_set("classes", to="abcdefghij"), "not a list of names"),
    "classes-numbers": (_set("classes", to=list(range(10))), "every class needs a name"),
    "classes-twice": (_set("classes", to=["a"] * 10), "names a class twice"),
    "classes-too-few": (_set("classes", to=list("abc")), "3 class names for 10 outputs"),
    "classes-not-utf8": (
        _set("classes", to=[*"abcdefghi", os.fsdecode(b"d\xffg")]),
        "not valid UTF-8",
    ),
    "recipe-a-number": (_set("recipe", to=5), "'recipe' is a int"),
    "epoch-a-string": (_set("epoch", to="twenty"), "'epoch' is a str"),
    "metrics-a-string": (_set("metrics", to="abc"), "'metrics' is not a list"),
    "metrics-val-acc-text": (_set("metrics", to=[{"val_acc": "high"}]), "not a number"),
    "test-a-string": (_set("test", to="abc"), "'test' is a str"),
    "test-accuracy-text": (_set("test", "accuracy", to="high"), "'test.accuracy'"),
    "test-per-class-text": (_set("test", "per_class", to="x"), "'test.per_class'"),
    "best-a-list": (_set("best", to=[1]), "'best' is a list"),
    "num-classes-text": (_set("model", "args", "num_classes", to="10"), "not an integer"),
    "num-classes-float": (_set("model", "args", "num_classes", to=10.0), "not an integer"),
    "num-classes-negative": (_set("model", "args", "num_classes", to=-1), "not in 1.."),
    "num-classes-huge": (_set("model", "args", "num_classes", to=10**13), "not in 1.."),
    "dropout-two": (_set("model", "args", "dropout", to=2.0), "'model.args.dropout'"),
    "args-null": (_set("model", "args", to=None), "'model.args' is missing"),
    "std-zero": (_set("preprocessing", "std", to=[0, 0, 0]), "std must be positive"),
    "mean-nan": (_set("preprocessing", "mean", to=[math.nan] * 3), "3 finite numbers"),
    "mean-two-values": (_set("preprocessing", "mean", to=[0.5, 0.5]), "3 finite numbers"),
    "input-size-zero": (_set("preprocessing", "input_size", to=0), "input_size is 0"),
    "input-size-unfit": (_set("preprocessing", "input_size", to=300), "does not fit"),
    "source-size-text": (_set("preprocessing", "source_size", to="32"), "whole number"),
    # float() read the string as (1.0, 2.0, 3.0); a huge integer overflowed it (a traceback).
    "mean-a-string": (_set("preprocessing", "mean", to="123"), "must be a list of numbers"),
    "mean-huge-int": (_set("preprocessing", "mean", to=[10**400] * 3), "'preprocessing' is"),
    "dropout-huge-int": (_set("model", "args", "dropout", to=10**400), "'model.args.dropout'"),
    "val-acc-huge-int": (_set("metrics", to=[{"val_acc": 10**400}]), "not a number"),
}

# Edits of an export's model.json alone: its shard and tensor tables.
INDEX_EDITS = {
    "model-a-string": (_set("model", to="AlexNet"), "holds architecture None"),
    "export-null-test-text": (_set("export", to={"test": "x"}), "'export.test' is a str"),
    "files-a-list": (_set("files", to=[]), "'files' is not an object"),
    "file-entry-a-string": (_set("files", _first, to="x"), "needs a sha256"),
    "file-without-sha": (_drop("files", _first, "sha256"), "needs a sha256"),
    "file-bytes-text": (_set("files", _first, "bytes", to="15661680"), "needs a sha256"),
    "shard-elsewhere": (
        lambda index: index["files"].update({"../w/x.safetensors": {"sha256": "0", "bytes": 1}}),
        "not a plain file name",
    ),
    "tensors-a-list": (_set("tensors", to=[]), "'tensors' is not an object"),
    "tensor-null": (_set("tensors", _first, to=None), "needs a shape"),
    "tensor-without-shape": (_drop("tensors", _first, "shape"), "needs a shape"),
    "parts-a-string": (_set("tensors", _first, "parts", to="x"), "needs a shape"),
    "parts-empty": (_set("tensors", "fc3.bias", "parts", "value", to=[]), "missing or empty"),
    "part-of-unknown-shard": (
        _set("tensors", "fc3.bias", "parts", "value", 0, "file", to="other.safetensors"),
        "names a shard that 'files' does not list",
    ),
    "part-without-rows": (_drop("tensors", "fc3.bias", "parts", "value", 0, "rows"), "its rows"),
    # fc1's int8 weight is split over shards: its parts swapped fit together as well, and
    # loaded other weights without a word.
    "parts-swapped": (
        lambda index: index["tensors"]["fc1.1.weight"]["parts"]["int8"].reverse(),
        "is not rows",
    ),
}


@pytest.mark.parametrize("edit, message", list({**SHARED_EDITS, **INDEX_EDITS}.values()),
                         ids=list({**SHARED_EDITS, **INDEX_EDITS}))  # fmt: skip
def test_a_damaged_model_json_is_one_clear_error(
    artifact: Path, tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    for path in artifact.iterdir():
        (folder / path.name).symlink_to(path)  # the shards as they are (and no copying)
    index = json.loads((artifact / INDEX_NAME).read_text())
    index.setdefault("export", None)
    edit(index)
    (folder / INDEX_NAME).unlink()
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(folder)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


# A training checkpoint goes through the same checks; a few of them, as saving 230 MB is slow.
CHECKPOINT_EDITS = {
    k: SHARED_EDITS[k]
    for k in ("classes-numbers", "recipe-a-number", "num-classes-text", "std-zero", "mean-nan")
}


@pytest.mark.parametrize(
    "edit, message", list(CHECKPOINT_EDITS.values()), ids=list(CHECKPOINT_EDITS)
)
def test_a_damaged_checkpoint_is_one_clear_error(
    ckpt: dict, tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    damaged = {**ckpt, "model": {**ckpt["model"], "args": dict(ckpt["model"]["args"])}}
    damaged["preprocessing"] = dict(ckpt["preprocessing"])
    damaged["test"] = dict(ckpt["test"])
    edit(damaged)
    path = tmp_path / "last.pt"
    torch.save(damaged, path)
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(path)
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_deeply_nested_model_json_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / INDEX_NAME).write_text("[" * 200_000)
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_for_inference(tmp_path)


def test_weights_with_nan_are_refused_at_export_and_at_load(
    ckpt: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    diverged = {**ckpt, "model": {**ckpt["model"], "state_dict": dict(ckpt["model"]["state_dict"])}}
    diverged["model"]["state_dict"]["fc2.1.weight"] = torch.full((4096, 4096), math.nan)
    path = tmp_path / "last.pt"
    torch.save(diverged, path)
    with pytest.raises(CheckpointError, match=r"fc2\.1\.weight holds NaN or infinite values"):
        load_for_inference(path)
    assert export_main([str(path), "--out", str(tmp_path / "w")]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_weights_that_do_not_fit_are_one_line(ckpt: dict, tmp_path: Path) -> None:
    wrong = {**ckpt, "model": {**ckpt["model"], "args": {**ckpt["model"]["args"]}}}
    wrong["model"]["args"]["num_classes"] = 3
    wrong["classes"] = ["a", "b", "c"]
    path = tmp_path / "last.pt"
    torch.save(wrong, path)
    with pytest.raises(CheckpointError) as caught:
        load_for_inference(path)
    text = str(caught.value)
    assert "do not fit the network: size mismatch for fc3.weight" in text and "\n" not in text


def test_a_class_folder_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    for name in ("cat", os.fsdecode(b"d\xffg")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"class folder b'd\\xffg' .* is not valid UTF-8"):
        list_image_folder(tmp_path)
