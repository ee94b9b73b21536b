"""The network is the notebook's: same modules, same parameter count, same output shape."""

from __future__ import annotations

import pytest
import torch

from training.model import AlexNet, AlexNetConfig, count_parameters

NOTEBOOK_PARAMETERS = 58_325_066


@pytest.fixture(scope="module")
def model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet().eval()


def test_parameter_count_matches_the_notebook(model: AlexNet) -> None:
    assert count_parameters(model) == NOTEBOOK_PARAMETERS
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == NOTEBOOK_PARAMETERS


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(model: AlexNet, batch: int) -> None:
    with torch.inference_mode():
        out = model(torch.randn(batch, 3, 227, 227))
    assert out.shape == (batch, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_module_names_match_the_notebook(model: AlexNet) -> None:
    names = [name for name, _ in model.named_children()]
    assert names == ["layer1", "layer2", "layer3", "layer4", "layer5", "fc1", "fc2", "fc3"]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # The notebook's state-dict keys: Sequential(Conv, BN, ReLU[, MaxPool]) and
    # Sequential(Dropout, Linear, ReLU), so its saved weights load into this model.
    assert shapes["layer1.0.weight"] == (96, 3, 11, 11)
    assert shapes["layer1.1.running_mean"] == (96,)
    assert shapes["layer2.0.weight"] == (256, 96, 5, 5)
    assert shapes["layer3.0.weight"] == (384, 256, 3, 3)
    assert shapes["layer4.0.weight"] == (384, 384, 3, 3)
    assert shapes["layer5.0.weight"] == (256, 384, 3, 3)
    assert shapes["fc1.1.weight"] == (4096, 9216)
    assert shapes["fc2.1.weight"] == (4096, 4096)
    assert shapes["fc3.weight"] == (10, 4096)
    assert isinstance(model.fc1[0], torch.nn.Dropout)
    assert isinstance(model.layer1[3], torch.nn.MaxPool2d)
    assert len(model.layer3) == 3  # no pooling after blocks 3 and 4


def test_config_round_trip_and_class_count() -> None:
    config = AlexNetConfig(num_classes=3, dropout=0.25)
    assert AlexNetConfig.from_dict({**config.to_dict(), "unknown": 1}) == config
    small = AlexNet(config)
    assert small.fc3.out_features == 3
    assert small.fc1[0].p == 0.25
    assert count_parameters(small) == NOTEBOOK_PARAMETERS - 7 * 4097
