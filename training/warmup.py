"""A GPU's one-time costs, paid while the data set decodes on the CPU.

A process's first training steps on a GPU pay for things that happen once: CUDA loads kernels
lazily, cuBLAS and cuDNN create handles and workspaces and, with --cudnn-benchmark, cuDNN times
every candidate algorithm for each convolution shape, forward and backward (about 2 s of an
H200 run's start-up, where a whole epoch of `seed` takes 2.2 s). None of it depends on the
data, so `warm_up` runs the training step and an evaluation batch on a stand-in model of the
same shapes, fed zeros, while the image decoding runs in worker processes; the real steps then
find their kernels loaded and their algorithms chosen.

It must run on the thread that trains: PyTorch keeps cuDNN's benchmark results per thread.
"""

from __future__ import annotations

import torch

from training.data import Split
from training.engine import Precision, TrainStep, predict
from training.model import AlexNet, AlexNetConfig, use_space_to_depth
from training.preprocess import InputTransform, Preprocessing


def warm_up(
    device: torch.device,
    *,
    batch_size: int,
    eval_batch_size: int,
    precision: Precision,
    model_config: AlexNetConfig,
    augment: str,
    crop_padding: int,
    prep: Preprocessing,
) -> None:
    """Two training steps (each optimizer step moves nothing: lr 0) and one evaluation batch
    on a throwaway model, as `train` will run them on `device`; the caller's random number
    generators are left as they were, so a run with a warm-up trains exactly as one without."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = AlexNet(model_config).to(
            device, memory_format=torch.channels_last if precision.channels_last else None
        )
        use_space_to_depth(model, device.type == "cuda")
        transform = InputTransform(prep).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.0, momentum=0.9, fused=device.type == "cuda"
        )
        size = prep.source_size
        images = torch.zeros((batch_size, 3, size, size), dtype=torch.uint8, device=device)
        labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        step = TrainStep(
            model,
            transform,
            optimizer,
            Split(images, labels),
            local_batch_size=batch_size,
            label_smoothing=0.0,
            augment=augment,
            crop_padding=crop_padding,
            precision=precision,
        )
        index = torch.arange(batch_size, device=device)
        for _ in range(2):  # the first step has no momentum yet; the second is every later one
            step(index)
        batch = torch.zeros((eval_batch_size, 3, size, size), dtype=torch.uint8, device=device)
        predict(model, transform, batch, batch_size=eval_batch_size, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
