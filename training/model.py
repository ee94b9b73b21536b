"""The notebook's AlexNet, layer for layer, and the arguments that rebuild it from a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "alexnet-cifar10-notebook"


@dataclass(frozen=True)
class AlexNetConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    num_classes: int = 10
    dropout: float = 0.5  # before fc1 and fc2, as in the notebook

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlexNetConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class StridedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same function) that can run a large strided kernel as a
    small stride-1 one over a space-to-depth view of its input.

    conv1 (11x11, stride 4, 3 input channels) is 9% of AlexNet's FLOPs but was about half of a
    bf16 training step on an H200: three input channels and an 11x11 window suit no tensor-core
    kernel. Folding each 4x4 pixel block into channels (3 -> 48) and zero-padding the kernel to
    12x12 (= 3x3 blocks) turns it into a 3x3 stride-1 convolution that they do suit. The
    arithmetic is the same; only the summation order differs. Slower on CPUs, so it is off
    unless `space_to_depth` is set (training and inference turn it on for CUDA).
    """

    space_to_depth: bool = False

    def _foldable(self) -> bool:
        """The form covers square kernels and strides, zero padding given in pixels, no
        dilation or groups; any other convolution runs as it is."""
        return (
            self.kernel_size[0] == self.kernel_size[1]
            and self.stride[0] == self.stride[1]
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.space_to_depth and self._foldable()):
            return super().forward(x)
        s, k = self.stride[0], self.kernel_size[0]
        blocks = -(-k // s)  # kernel size in s x s blocks: ceil(11 / 4) = 3
        (ph, pw), (h, w) = self.padding, x.shape[-2:]
        # Output size, then the input that many windows cover in whole blocks: 55 and 228 for
        # conv1 (its last window reads one zero-weighted pixel more); extra input is cropped.
        out_h, out_w = (h + 2 * ph - k) // s + 1, (w + 2 * pw - k) // s + 1
        size_h, size_w = (out_h - 1 + blocks) * s, (out_w - 1 + blocks) * s
        x = F.pad(x, (pw, size_w - w - pw, ph, size_h - h - ph))
        b, c, nh, nw = x.shape[0], x.shape[1], size_h // s, size_w // s
        # [b, c, nh*s, nw*s] -> [b, c*s*s, nh, nw], laid out channels-last (one copy)
        x = x.reshape(b, c, nh, s, nw, s).permute(0, 2, 4, 1, 3, 5).reshape(b, nh, nw, c * s * s)
        x = x.permute(0, 3, 1, 2)
        pad = blocks * s - k
        weight = F.pad(self.weight, (0, pad, 0, pad))
        o = weight.shape[0]
        weight = weight.reshape(o, c, blocks, s, blocks, s).permute(0, 1, 3, 5, 2, 4)
        weight = weight.reshape(o, c * s * s, blocks, blocks)
        return F.conv2d(x, weight.contiguous(memory_format=torch.channels_last), self.bias)


def use_space_to_depth(model: nn.Module, enabled: bool) -> None:
    """Switch every StridedConv2d in `model` to (or from) its space-to-depth form."""
    for module in model.modules():
        if isinstance(module, StridedConv2d):
            module.space_to_depth = enabled


class AlexNet(nn.Module):
    """5 conv blocks (Conv-BN-ReLU, max-pool after 1, 2, 5) and 3 linear layers; 227x227 input.

    Module names match the notebook (`layer1`..`layer5`, `fc1`..`fc3`) so its state dicts load.
    """

    def __init__(self, config: AlexNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AlexNetConfig()
        p = self.config.dropout
        self.layer1 = _conv_block(
            3, 96, kernel_size=11, stride=4, padding=0, pool=True, conv=StridedConv2d
        )
        self.layer2 = _conv_block(96, 256, kernel_size=5, padding=2, pool=True)
        self.layer3 = _conv_block(256, 384, kernel_size=3, padding=1)
        self.layer4 = _conv_block(384, 384, kernel_size=3, padding=1)
        self.layer5 = _conv_block(384, 256, kernel_size=3, padding=1, pool=True)
        self.fc1 = nn.Sequential(nn.Dropout(p), nn.Linear(256 * 6 * 6, 4096), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Dropout(p), nn.Linear(4096, 4096), nn.ReLU())
        self.fc3 = nn.Linear(4096, self.config.num_classes)

    def head_parameters(self) -> list[nn.Parameter]:
        """fc1-fc3's weights and biases: 94% of the parameters, and the first gradients that a
        backward pass produces."""
        return [*self.fc1.parameters(), *self.fc2.parameters(), *self.fc3.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))


class ConvBlock(nn.Sequential):
    """Conv, BatchNorm, ReLU and an optional max-pool: the notebook's modules in its order (so
    its state dicts load), run with the pool before the ReLU.

    The two commute exactly: ReLU is monotone, so the max of ReLUs is the ReLU of the max, and
    in the backward pass both orders send each window's gradient to the same element (or
    nowhere when the window's maximum is <= 0). Pooling first runs the ReLU, forward and
    backward, on a quarter of the values (55x55 -> 27x27 after conv1). `pool_first` off runs
    the notebook's order (the benchmarks' baseline; see `use_pool_first`).
    """

    pool_first: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_first:
            return super().forward(x)
        conv, norm, relu, *pool = self
        x = norm(conv(x))
        for p in pool:
            x = p(x)
        return relu(x)


def use_pool_first(model: nn.Module, enabled: bool) -> None:
    """Run every ConvBlock in `model` with its max-pool before (or, as the notebook, after) its
    ReLU: the same results either way."""
    for module in model.modules():
        if isinstance(module, ConvBlock):
            module.pool_first = enabled


def _conv_block(
    c_in: int,
    c_out: int,
    *,
    kernel_size: int,
    stride: int = 1,
    padding: int,
    pool: bool = False,
    conv: type[nn.Conv2d] = nn.Conv2d,
) -> ConvBlock:
    layers: list[nn.Module] = [
        conv(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=padding),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(3, stride=2))
    return ConvBlock(*layers)


def fits_input(size: int) -> bool:
    """Whether a size x size input reaches fc1 as the 6x6 map it was built for (227 does;
    the notebook's arithmetic: conv1 11/4 -> 55, pools 3/2 -> 27 -> 13 -> 6)."""
    side = (size - 11) // 4 + 1 if size >= 11 else 0
    for _ in range(3):  # the max-pools after blocks 1, 2 and 5; the other convs keep the size
        side = (side - 3) // 2 + 1 if side >= 3 else 0
    return side == 6


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
