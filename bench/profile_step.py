"""Where a training step's time goes, layer by layer (forward + backward), on random data.

    python3 -m bench.profile_step --batches 64,256

Times each block of the network alone (CUDA events, median of repeats) in the training
precision, with a few variants of the first convolution (3 input channels are a poor fit for
tensor cores), then the whole step eager vs CUDA graph, NHWC vs NCHW. Random inputs: kernel
times do not depend on pixel values, and no data set has to be decoded.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from torch import nn

from training.data import Split
from training.engine import Precision, TrainStep
from training.model import AlexNet
from training.preprocess import InputTransform


def time_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(module: nn.Module, x: torch.Tensor):
    # Input gradients are needed everywhere but at the image (as in training).
    x = x.detach().requires_grad_(x.shape[1] != 3)

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = module(x)
        y.float().sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="64,256")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    print(
        f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        for cl in (True, False):
            fmt = torch.channels_last if cl else torch.contiguous_format
            model = AlexNet().to(dev, memory_format=fmt)
            x = torch.randn(batch, 3, 227, 227, device=dev, dtype=torch.bfloat16).contiguous(
                memory_format=fmt
            )
            rows = []
            for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
                block = getattr(model, name)
                rows.append((name, time_ms(fwd_bwd(block, x))))
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    x = block(x).contiguous(memory_format=fmt)
            flat = torch.randn(batch, 9216, device=dev, dtype=torch.bfloat16)
            head = nn.Sequential(model.fc1, model.fc2, model.fc3)
            rows.append(("fc1-3", time_ms(fwd_bwd(head, flat))))
            opt = torch.optim.SGD(
                model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True
            )
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            rows.append(("SGD step (fused)", time_ms(opt.step)))
            # conv1 variants: input channels zero-padded to 4 / 8 (same function, wider weight)
            for c_in in (4, 8):
                conv = nn.Sequential(
                    nn.Conv2d(c_in, 96, 11, stride=4),
                    nn.BatchNorm2d(96),
                    nn.ReLU(),
                    nn.MaxPool2d(3, 2),
                )
                conv = conv.to(dev, memory_format=fmt)
                xi = torch.randn(
                    batch, c_in, 227, 227, device=dev, dtype=torch.bfloat16
                ).contiguous(memory_format=fmt)
                rows.append((f"layer1 with {c_in} input channels", time_ms(fwd_bwd(conv, xi))))
            total = sum(t for n, t in rows[:7])
            print(
                f"\nbatch {batch}, bf16 autocast, {'channels_last' if cl else 'NCHW'}: blocks sum {total:.2f} ms"
            )
            for name, t in rows:
                print(f"  {name:<32} {t:7.3f} ms")
            # the whole step, eager vs graph
            images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, device=dev)
            split = Split(images, torch.randint(0, 10, (4096,), device=dev))
            for graph in (False, True):
                m = AlexNet().to(dev, memory_format=fmt)
                o = torch.optim.SGD(
                    m.parameters(),
                    lr=torch.tensor(0.01, device=dev) if graph else 0.01,
                    momentum=0.9,
                    weight_decay=5e-4,
                    fused=True,
                )
                step = TrainStep(
                    m,
                    InputTransform().to(dev),
                    o,
                    split,
                    local_batch_size=batch,
                    label_smoothing=0.1,
                    augment="crop-flip" if batch > 64 else "none",
                    crop_padding=4,
                    precision=Precision(torch.bfloat16, cl),
                )
                if graph:
                    step.capture_graph(m)
                idx = torch.arange(batch, device=dev)
                print(
                    f"  whole step, {'CUDA graph' if graph else 'eager':<10}          {time_ms(functools.partial(step, idx)):7.3f} ms"
                )


if __name__ == "__main__":
    main()
