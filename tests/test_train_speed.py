"""bench.train_speed on the CPU: every row runs on real (generated) image files and the table
holds them, the notebook's baseline in the notebook's block order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_speed


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
    table = capsys.readouterr().out
    assert table.count("\n| ") == 5  # header, rule and three rows
    assert "| notebook: PIL per image, fp32, batch 64 |" in table
