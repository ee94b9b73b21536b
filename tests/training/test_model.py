"""The network is the notebook's: same modules, same parameter count, same output shape."""

from __future__ import annotations

import pytest
import torch

from training.model import (
    AlexNet,
    AlexNetConfig,
    StridedConv2d,
    count_parameters,
    use_pool_first,
    use_space_to_depth,
)

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


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [
        (11, 4, 0, (227, 227)),  # conv1: the input is padded to 228, a whole number of blocks
        (11, 4, 0, (66, 66)),  # more input than the last window reads: cropped to 64
        (5, 2, 1, (17, 23)),  # padding, and a rectangle
        (4, 4, 0, (16, 12)),  # a kernel of exactly one block
    ],
)
def test_space_to_depth_is_the_same_convolution(
    kernel: int, stride: int, padding: int, size: tuple[int, int]
) -> None:
    """conv1 runs in its space-to-depth form on CUDA (training and serving); on the CPU, in
    float64, it must give the plain convolution's output and gradients."""
    torch.manual_seed(0)
    conv = StridedConv2d(3, 8, kernel_size=kernel, stride=stride, padding=padding).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    results = []
    for folded in (False, True):
        conv.space_to_depth = folded
        conv.zero_grad()
        x.grad = None
        out = conv(x)
        (
            out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        ).sum().backward()
        assert conv.weight.grad is not None and conv.bias.grad is not None and x.grad is not None
        results.append(
            (out.detach(), conv.weight.grad.clone(), conv.bias.grad.clone(), x.grad.clone())
        )
    for plain, folded in zip(*results, strict=True):
        torch.testing.assert_close(folded, plain, rtol=1e-10, atol=1e-10)


def test_space_to_depth_falls_back_where_it_does_not_apply() -> None:
    torch.manual_seed(0)
    conv = StridedConv2d(4, 4, kernel_size=3, stride=2, dilation=2, groups=2).double()
    x = torch.randn(1, 4, 15, 15, dtype=torch.float64)
    plain = conv(x)
    conv.space_to_depth = True
    torch.testing.assert_close(conv(x), plain, rtol=0, atol=0)


def test_space_to_depth_leaves_the_network_and_its_weights_as_they_were() -> None:
    torch.manual_seed(0)
    net = AlexNet().double().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 227, 227, dtype=torch.float64)
    with torch.inference_mode():
        plain = net(x)
        use_space_to_depth(net, True)
        assert net.layer1[0].space_to_depth
        folded = net(x)
    torch.testing.assert_close(folded, plain, rtol=1e-9, atol=1e-9)
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_before_the_relu_is_exactly_the_notebooks_order(dtype: torch.dtype) -> None:
    """Blocks 1, 2 and 5 pool before their ReLU (a quarter of the ReLU work); outputs and every
    gradient must be bit for bit those of the notebook's Conv-BN-ReLU-MaxPool order."""
    torch.manual_seed(0)
    block = AlexNet().layer2.to(dtype).train()
    with torch.no_grad():  # BatchNorm's shift, down: many 3x3 windows are all negative
        block[1].bias.fill_(-1.5)
    x = torch.randn(2, 96, 27, 27).to(dtype)

    def run(forward: object) -> tuple[torch.Tensor, ...]:
        block.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        out = forward(inputs)  # type: ignore[operator]
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype)).sum().backward()
        grads = [p.grad for p in block.parameters()]
        return (out.detach(), inputs.grad, *grads)

    ours = run(block)
    use_pool_first(block, False)
    notebooks = run(block)
    assert not torch.equal(block[1].weight.grad, torch.zeros_like(block[1].weight))
    assert (ours[0] == 0).float().mean() > 0.3  # the ReLU did cut
    for a, b in zip(ours, notebooks, strict=True):
        assert torch.equal(a, b)
