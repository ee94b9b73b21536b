"""The predictor's warm-up choice of precision on a CPU."""

from __future__ import annotations

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
