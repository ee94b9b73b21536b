"""The predictor's warm-up choice of precision on a CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.predictor import Predictor, load_predictor


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_warm_up_keeps_the_faster_precision_and_exact_fp32_weights(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, faster: str
) -> None:
    """The bf16 trial must not touch the fp32 weights: when fp32 wins, it serves the exact
    weights it loaded (not bf16-rounded ones). Timing is replaced so that `faster` wins."""

    def seconds(self: Predictor, images: torch.Tensor) -> float:
        dtype = next(self.loaded.model.parameters()).dtype
        return 1.0 if (dtype == torch.bfloat16) == (faster == "bf16") else 2.0

    monkeypatch.setattr(Predictor, "_seconds_per_batch", seconds)
    predictor = load_predictor(artifact, "cpu", "auto")
    predictor.warm_up(2, choose_precision=True)
    assert predictor.precision == predictor.warmup_report["chosen"] == faster
    served = predictor.loaded.model.state_dict()
    original = load_predictor(artifact, "cpu", "fp32").loaded.model.state_dict()
    expected_dtype = torch.bfloat16 if faster == "bf16" else torch.float32
    assert served["fc1.1.weight"].dtype == expected_dtype
    if faster == "fp32":
        for name, value in original.items():
            assert torch.equal(served[name], value), name
    probs = predictor.predict(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-4)


# Counts the process's OS threads before and after: libgomp's pool of OpenMP workers for a thread
# that ran a parallel op shows up as extra threads for as long as that thread lives.
_POOL_PROBE = """
import os, sys, time, torch
from pathlib import Path
from app.predictor import load_predictor
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
load_predictor(Path(sys.argv[1]), "cpu", "bf16")
deadline = time.monotonic() + 10  # an ended thread's pool workers exit on their own, soon after
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.05)
after_load = threads()
torch.ones(2**22).mul_(2)  # control: a parallel op on this thread does leave a pool
print(before, after_load, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")
def test_loading_leaves_no_openmp_pool_on_the_calling_thread(artifact: Path) -> None:
    """A pool left on the server's main thread, next to the inference thread's, makes libgomp
    sleep at every barrier of every forward pass (see load_predictor)."""
    out = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE, str(artifact)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    before, after_load, after_op = map(int, out.split())
    assert after_op > before, "the probe no longer sees a pool: it cannot test anything"
    assert after_load == before
