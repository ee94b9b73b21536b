"""bench.train_speed on the CPU: every row runs on real (generated) image files and the table
holds them, the notebook's baseline in the notebook's block order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_speed
from tests.helpers import assert_a_cut_short_report_keeps_the_last


@pytest.mark.slow
def test_the_table_holds_the_notebook_and_our_rows(
    image_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "speed.json"
    argv = ["--data-dir", str(image_tree), "--device", "cpu", "--steps", "1", "--warmup", "0"]
    assert train_speed.main([*argv, "--batches", "4", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pipeline"] for r in rows] == [
        "notebook: PIL per image, fp32, batch 64",
        "ours: GPU-resident uint8, fp32, crop-flip, eager, batch 4",
        "ours: GPU-resident uint8, fp32, crop-flip, pool before ReLU, eager, batch 4",
    ]
    assert all(r["ms_per_step"] > 0 for r in rows)
    # Every figure the table prints is in the JSON (steps/s and the ratio were missing).
    for r in rows:
        assert r["steps_per_s"] == pytest.approx(1000 / r["ms_per_step"])
        assert r["images_per_s_vs_notebook"] == pytest.approx(
            r["images_per_s"] / rows[0]["images_per_s"]
        )
    assert rows[0]["images_per_s_vs_notebook"] == 1.0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 5  # header, rule and three rows
    assert "| notebook: PIL per image, fp32, batch 64 |" in table


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--batches", "4,2S6"], "argument --batches: '4,2S6': '2S6' is not a whole number"),
        (["--steps", "0"], "argument --steps: 0 must be at least 1"),
        (["--warmup", "-1"], "argument --warmup: -1 must be 0 or more"),
        (["--notebook-steps", "0"], "argument --notebook-steps: 0 must be at least 1"),
        # The generated tree has 22 training images (24, less the validation tenth).
        (["--batches", "4,64"], "--batches 64: larger than the 22 training images"),
    ],
)
def test_bad_arguments_are_refused_before_any_timing(
    flags: list[str],
    says: str,
    image_tree: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The notebook baseline ran before --batches was parsed (`64,2S6`: its rows thrown away
    with a ValueError); --steps 0 was an UnboundLocalError; a batch larger than the training
    split a ZeroDivisionError in bench_ours."""

    def timed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a row was timed before the arguments were checked")

    monkeypatch.setattr(train_speed, "bench_notebook", timed)
    monkeypatch.setattr(train_speed, "bench_ours", timed)
    argv = ["--data-dir", str(image_tree), "--device", "cpu", "--steps", "1", "--warmup", "0"]
    with pytest.raises(SystemExit) as exit_:
        train_speed.main([*argv, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert says in err and "Traceback" not in err


def test_a_json_write_cut_short_leaves_the_previous_report(
    image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json-out was written in place: a kill or a full disk mid-write left half a report.
    (The rows are faked: only the writing is under test.)"""
    row = train_speed.Row("a pipeline", 4, 10.0, 5)
    monkeypatch.setattr(train_speed, "bench_notebook", lambda *args: row)
    monkeypatch.setattr(train_speed, "bench_ours", lambda *args, **kwargs: row)
    out = tmp_path / "speed.json"
    argv = ["--data-dir", str(image_tree), "--device", "cpu", "--batches", "4"]
    assert_a_cut_short_report_keeps_the_last(
        out, monkeypatch, lambda: train_speed.main([*argv, "--json-out", str(out)])
    )
