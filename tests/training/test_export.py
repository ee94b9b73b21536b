"""The serving artifact: int8 shards within size limits, checksums, faithful dequantization,
and the export/evaluate command lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import training.artifact
import training.data
import training.engine
from tests.app.support import make_checkpoint
from tests.helpers import (
    LONG_CLASS_NAMES,
    SHORT_CLASS_NAMES,
    assert_one_line_error,
    assert_per_class_column,
    run_cli,
    run_cli_into_a_closed_pipe,
)
from training.artifact import (
    INDEX_NAME,
    export_artifact,
    load_artifact_state,
    load_for_inference,
    quantize_per_channel,
    quantized_state_dict,
    read_index,
    staged_artifact,
)
from training.checkpoint import build_model, save_atomic
from training.folders import list_image_folder, resolve_image_root
from training.metadata import val_acc_at
from training.trainer import RunResult


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return make_checkpoint(seed=3)


def test_shards_respect_the_size_limit_and_split_large_tensors(ckpt: dict, tmp_path: Path) -> None:
    limit = 4 * 1024 * 1024  # fc1's int8 weight alone is 36 MiB: it must be split
    result = export_artifact(ckpt, tmp_path / "w", max_shard_bytes=limit)
    assert len(result.files) > 10
    assert all((tmp_path / "w" / name).stat().st_size <= limit for name in result.files)
    index = read_index(tmp_path / "w")
    assert len(index["tensors"]["fc1.1.weight"]["parts"]["int8"]) > 1
    assert "optimizer" not in index and index["classes"] == ckpt["classes"]
    assert index["preprocessing"] == ckpt["preprocessing"] and index["recipe"] == ckpt["recipe"]


def test_loading_gives_exactly_the_quantized_weights(ckpt: dict, tmp_path: Path) -> None:
    export_artifact(ckpt, tmp_path / "w", max_shard_bytes=6 * 1024 * 1024)
    loaded = load_artifact_state(tmp_path / "w", read_index(tmp_path / "w"))
    expected = quantized_state_dict(ckpt["model"]["state_dict"])
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_quantization_error_is_half_a_step_per_channel() -> None:
    weight = torch.randn(64, 3, 5, 5) * torch.logspace(-3, 1, 64).view(-1, 1, 1, 1)
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    error = (q.float() * scale.view(-1, 1, 1, 1) - weight).abs().flatten(1).amax(1)
    assert torch.all(error <= scale / 2 + 1e-7)


def test_the_artifact_predicts_like_the_checkpoint(ckpt: dict, tmp_path: Path) -> None:
    export_artifact(ckpt, tmp_path / "w")
    full = build_model(ckpt).eval()
    served = load_for_inference(tmp_path / "w")
    x = torch.randn(8, 3, 227, 227)
    with torch.no_grad():
        a, b = full(x), served.model(x)
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() > 0.999
    assert served.info["format"] == "artifact" and len(served.info["sha256"]) == 64


def test_an_export_without_test_data_claims_no_test_accuracy(ckpt: dict, tmp_path: Path) -> None:
    # The int8 weights were never measured: the checkpoint's figure is not theirs.
    export_artifact(ckpt, tmp_path / "w")
    info = load_for_inference(tmp_path / "w").info
    assert info["test_accuracy"] is None and info["test_per_class"] is None
    assert info["checkpoint_test_accuracy"] == round(ckpt["test"]["accuracy"], 2)


def test_a_best_pt_reports_the_validation_accuracy_of_its_own_epoch(
    ckpt: dict, tmp_path: Path
) -> None:
    """A best.pt holds epoch 2's weights and the whole run's metrics: the final epoch's 13.0
    used to be reported as theirs."""
    best = {**ckpt, "epoch": 2, "best": {"epoch": 2, "val_acc": 12.0}}
    save_atomic(best, tmp_path / "best.pt")
    export_artifact(best, tmp_path / "w")
    for path in (tmp_path / "best.pt", tmp_path / "w"):
        info = load_for_inference(path).info
        assert (info["epoch"], info["validation_accuracy"]) == (2, 12.0), path
    unnumbered = {**best, "metrics": [{"val_acc": 11.0}, {"val_acc": 14.0}]}
    save_atomic(unnumbered, tmp_path / "unnumbered.pt")  # no epoch to match: the last one's
    assert load_for_inference(tmp_path / "unnumbered.pt").info["validation_accuracy"] == 14.0


def test_the_validation_accuracy_of_an_epoch() -> None:
    numbered = [{"epoch": e, "val_acc": 10.0 + e} for e in (1, 2, 3)]
    assert val_acc_at(numbered, 2) == 12.0
    assert val_acc_at(numbered, None) == 13.0  # a file not naming its epoch: the last one's
    assert val_acc_at(numbered, 7) is None  # not another epoch's figure
    unnumbered = [{"val_acc": 11.0}, {"val_acc": 14.0}]
    assert val_acc_at(unnumbered, None) == val_acc_at(unnumbered, 1) == 14.0  # was 11.0 for None
    assert val_acc_at([], 1) is None


def test_a_new_export_replaces_the_shards_and_keeps_the_model_card(
    ckpt: dict, tmp_path: Path
) -> None:
    out = tmp_path / "w"
    export_artifact(ckpt, out, max_shard_bytes=8 * 1024 * 1024)
    (out / "README.md").write_text("model card")
    result = export_artifact(ckpt, out)  # default 15 MiB shards: fewer files
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == sorted(result.files)
    assert (out / "README.md").read_text() == "model card"
    assert load_for_inference(out).classes == ckpt["classes"]


def test_a_staged_artifact_that_fails_its_checks_leaves_the_folder_as_it_was(
    ckpt: dict, tmp_path: Path
) -> None:
    out = tmp_path / "w"
    export_artifact(ckpt, out, max_shard_bytes=8 * 1024 * 1024)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="rejected"), staged_artifact(ckpt, out) as staged:
        assert staged.out_dir.parent == out  # the same file system: installs are renames
        assert load_for_inference(staged.out_dir).classes == ckpt["classes"]  # checkable
        raise RuntimeError("rejected")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.slow
def test_export_and_evaluate_command_lines(
    seed_run: RunResult, image_tree: Path, tmp_path: Path
) -> None:
    out = tmp_path / "weights"
    result = run_cli(
        "-m",
        "training.export",
        seed_run.last,
        "--out",
        out,
        "--data-dir",
        image_tree,
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    export = json.loads((out / INDEX_NAME).read_text())["export"]
    assert export["test"]["images"] == 6
    assert abs(export["accuracy_drop_points"]) <= 100 / 6 + 1e-9  # at most one of 6 images
    assert export["accuracy_drop_points"] == pytest.approx(
        export["full_precision_test_accuracy"] - export["test"]["accuracy"]
    )
    assert 0 <= export["top1_disagreements"] <= 6 and export["evaluated_with"] == "fp32 on cpu"

    predictions = tmp_path / "predictions.json"
    result = run_cli(
        "-m", "training.evaluate", out, "--data-dir", image_tree, "--device", "cpu",
        "--predictions-out", predictions, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    by_name = json.loads(predictions.read_text())
    root = resolve_image_root(image_tree)
    paths, labels, _ = list_image_folder(root / "test")
    names = [p.relative_to(root).as_posix() for p in paths]
    assert sorted(by_name) == sorted(names)
    correct = sum(by_name[n] == label for n, label in zip(names, labels, strict=True))
    assert report["accuracy"] == pytest.approx(correct / len(names) * 100)
    assert report["accuracy"] == pytest.approx(export["test"]["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["unbuffered", "buffered"])
def test_export_into_a_closed_pipe_installs_the_artifact(
    seed_run: RunResult, image_tree: Path, tmp_path: Path, unbuffered: str
) -> None:
    """`... | head -1`: with PYTHONUNBUFFERED (set in the Docker image) the first progress line
    raised BrokenPipeError inside the export, which was abandoned, nothing installed."""
    out = tmp_path / "weights"
    result = run_cli_into_a_closed_pipe(
        "-m", "training.export", seed_run.last, "--out", out, "--data-dir", image_tree,
        "--device", "cpu", PYTHONUNBUFFERED=unbuffered,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((out / INDEX_NAME).read_text())["export"]["test"]["images"] == 6


def test_export_refuses_test_data_of_other_classes_before_writing_anything(
    ckpt: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The class check ran after the shards were staged: 58 MB written for nothing, and a
    new --out folder left behind, empty."""
    from PIL import Image

    from training import export

    last = tmp_path / "last.pt"
    save_atomic(ckpt, last)
    for split in ("train", "test"):
        for name in ("ant", "bee"):  # not the checkpoint's classes
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (9, 99, 199)).save(folder / "0.png")
    out = tmp_path / "w"
    code = export.main([
        str(last), "--out", str(out), "--data-dir", str(tmp_path / "data"), "--device", "cpu"
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the data's classes are not the model's: only in the data" in err[0]
    assert not out.exists()


def test_export_refuses_a_missing_gpu_before_writing_anything(
    ckpt: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device cuda where there is none: one line, as the other commands say it, and no
    folder. Without test data the flag was ignored; with it, 58 MB of shards were written
    first."""
    from training import export

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    last = tmp_path / "last.pt"
    save_atomic(ckpt, last)
    out = tmp_path / "w"
    assert export.main([str(last), "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0] and "use cpu or auto" in err[0]
    assert not out.exists()


def test_evaluate_refuses_a_missing_gpu_before_decoding(
    ckpt: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import evaluate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        training.data, "load_test_split", lambda *a: pytest.fail("decoded the data")
    )
    last = tmp_path / "last.pt"
    save_atomic(ckpt, last)
    assert evaluate.main([str(last), "--data-dir", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = run_cli("-m", "training.export", tmp_path / "nope.pt", "--out", tmp_path / "w")
    assert_one_line_error(result, "does not exist")


@pytest.mark.slow
def test_export_and_evaluate_refuse_unusable_paths_in_one_line(
    seed_run: RunResult, image_tree: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "sub"):
        result = run_cli("-m", "training.export", seed_run.last, "--out", out)
        assert_one_line_error(result, "cannot write the artifact to", "choose another --out")
    for drop in ("nan", "-1"):
        result = run_cli(
            "-m", "training.export", seed_run.last, "--out", tmp_path / "w", "--max-drop", drop
        )  # fmt: skip
        assert_one_line_error(result, "--max-drop must be 0 or more")
    evaluate = (
        "-m",
        "training.evaluate",
        seed_run.last,
        "--data-dir",
        image_tree,
        "--device",
        "cpu",
    )
    assert_one_line_error(run_cli(*evaluate, "--batch-size", "0"), "--batch-size")
    for out in (tmp_path, tmp_path / "no-such-folder" / "p.json"):  # checked before evaluating
        result = run_cli(*evaluate, "--predictions-out", out)
        assert_one_line_error(result, "--predictions-out")


def test_evaluate_refuses_an_unwritable_predictions_file_before_evaluating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only file system (here: os.access says no, as it does there even for root) is
    named before anything loads: the model path does not even exist, so a check made after
    loading would report that instead, and one made after evaluating would lose the report."""
    from training import errors, evaluate

    monkeypatch.setattr(errors.os, "access", lambda path, mode: False)
    out = tmp_path / "p.json"
    code = evaluate.main([
        str(tmp_path / "no-model"), "--data-dir", str(tmp_path), "--predictions-out", str(out),
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --predictions-out {out} cannot be written (no permission, or a read-only file "
        "system)"
    ]


def test_a_predictions_file_through_a_link_to_nowhere_is_refused_up_front(tmp_path: Path) -> None:
    """The write follows the link (report.write_text_atomic): its target's folder is missing,
    so the predictions were lost after the whole evaluation. A link to a file that can be
    written is fine."""
    from training.errors import UserError, check_output_file

    link = tmp_path / "p.json"
    link.symlink_to(tmp_path / "no-such-folder" / "p.json")
    with pytest.raises(UserError, match=r"is a symbolic link to .*no-such-folder"):
        check_output_file("--predictions-out", link)
    fine = tmp_path / "fine.json"
    fine.symlink_to(tmp_path / "target.json")
    check_output_file("--predictions-out", fine)


@pytest.mark.parametrize("per_class", [LONG_CLASS_NAMES, SHORT_CLASS_NAMES], ids=["long", "short"])
def test_evaluate_prints_the_per_class_accuracies_in_one_column(
    per_class: dict[str, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Class names longer than 12 characters pushed their percentage out of the column."""
    from training import evaluate

    report = {"accuracy": 50.0, "images": 6, "images_per_s": 1.0, "per_class": per_class}
    monkeypatch.setattr(training.artifact, "load_for_inference", lambda path: None)
    monkeypatch.setattr(training.data, "load_test_split", lambda *a: (None, list(per_class), []))
    monkeypatch.setattr(
        training.engine, "evaluate_model", lambda *a, **k: (report, torch.tensor([]))
    )
    assert evaluate.main([str(tmp_path / "last.pt"), "--device", "cpu"]) == 0
    assert_per_class_column(capsys.readouterr().out, per_class)


def test_evaluate_prints_its_report_when_the_predictions_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When writing the predictions fails (a full disk), the report is printed all the same,
    then the error."""
    from training import evaluate

    per_class = {"a": 100.0, "b": 0.0}
    report = {"accuracy": 50.0, "images": 2, "images_per_s": 1.0, "per_class": per_class}
    monkeypatch.setattr(training.artifact, "load_for_inference", lambda path: None)
    monkeypatch.setattr(training.data, "load_test_split", lambda *a: (None, ["a", "b"], ["x", "y"]))
    monkeypatch.setattr(
        training.engine, "evaluate_model", lambda *a, **k: (report, torch.tensor([0, 0]))
    )
    out = tmp_path / "p.json"
    out.write_text('{"x": 1, "y": 1}')  # an earlier run's predictions
    real_write_text = Path.write_text

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        real_write_text(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    code = evaluate.main(
        [str(tmp_path / "last.pt"), "--device", "cpu", "--predictions-out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out.startswith(f"{tmp_path / 'last.pt'}: 50.00% top-1 on 2 images")
    assert captured.err.strip() == f"error: cannot write {out}: No space left on device"
    # Not half of the new file: the earlier one, whole, and no temporary file beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    assert out.read_text() == '{"x": 1, "y": 1}'


def test_evaluate_refuses_to_write_its_predictions_over_the_model(
    ckpt: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before anything loads: the model would otherwise be replaced by a JSON file."""
    from training import evaluate

    save_atomic(ckpt, tmp_path / "last.pt")
    export_artifact(ckpt, tmp_path / "w")
    before = {p: p.read_bytes() for p in (tmp_path / "last.pt", tmp_path / "w" / INDEX_NAME)}
    cases = [
        (tmp_path / "last.pt", tmp_path / "last.pt", "is the model being evaluated"),
        (tmp_path / "w", tmp_path / "w" / INDEX_NAME, "is inside the model folder being evaluated"),
        (tmp_path / "w", tmp_path / "w" / "p.json", "is inside the model folder being evaluated"),
        (  # the artifact named by its index: its shards are the model too
            tmp_path / "w" / INDEX_NAME,
            next((tmp_path / "w").glob("model-*.safetensors")),
            "is inside the model folder being evaluated",
        ),
    ]
    for model, out, why in cases:
        code = evaluate.main(
            [str(model), "--data-dir", str(tmp_path), "--predictions-out", str(out)]
        )
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --predictions-out {out} {why}; choose another path"
    assert all(p.read_bytes() == data for p, data in before.items())
