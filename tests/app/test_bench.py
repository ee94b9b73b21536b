"""The serving benchmark runs end to end on a small budget and reports what its README table
needs: a baseline per configuration, and per load level only answered requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import model_alone, serve_load


@pytest.mark.slow
def test_model_alone_in_two_processes_sums_their_throughput(artifact: Path) -> None:
    one = model_alone.measure(artifact, "cpu", "fp32", [1, 2], 0.2, threads=1, procs=1)
    two = model_alone.measure(artifact, "cpu", "fp32", [1, 2], 0.2, threads=1, procs=2)
    assert (one["procs"], two["procs"]) == (1, 2)
    assert one["precision"] == two["precision"] == "fp32"
    for batch in (1, 2):
        assert one["batches"][batch]["ms"] > 0
        # Two processes each report their own images/s; the sum exceeds either alone.
        assert two["batches"][batch]["images_per_s"] > 0.5 * one["batches"][batch]["images_per_s"]


@pytest.mark.slow
def test_serve_load_measures_the_service_next_to_its_baseline(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "load.json"
    code = serve_load.main([
        "--checkpoint", str(artifact), "--device", "cpu", "--precision", "fp32",
        "--concurrency", "1,4", "--seconds", "1", "--warmup", "0.3",
        "--model-batches", "1,4", "--model-seconds", "0.2", "--max-batch-size", "4",
        "--json-out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "fp32"
    configs = [r["config"] for r in report["rows"]]
    assert len(configs) == 4 and "batching off" in configs[-1]
    for row in report["rows"]:
        assert set(row["statuses"]) == {"200"}, row  # every request answered, none refused
        assert row["rps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_cpu_ms"] >= row["event_loop_cpu_ms"] > 0 and row["model_alone_best"] > 0
        # Shares of the 1 s window; a batch running at its edge counts whole, hence the slack.
        assert 0 < row["model_busy"] <= 1.25 and 0 < row["event_loop_busy"] <= 1.25
        assert 0 < row["decode_ms"] < row["p50_ms"]
    batched_c4 = report["rows"][1]
    assert batched_c4["concurrency"] == 4 and batched_c4["mean_batch"] >= 1
    assert report["rows"][3]["mean_batch"] == 1  # max_batch_size=1 really runs one at a time
    table = capsys.readouterr().out
    assert "| configuration | concurrency | requests/s |" in table


def test_each_row_is_compared_with_the_baselines_around_it() -> None:
    assert serve_load.around_rows(["a", "b", "c", "d"], 3) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert serve_load.around_rows(["a", "d"], 3) == [("a", "d")] * 3  # --baseline-at ends
