"""A checkpoint's accuracy with BatchNorm (and dropout) used four ways, side by side.

    python -m bench.bn_modes runs/seed-.../last.pt --data-dir DIR [--device cuda]

Why: the notebook never calls `model.eval()`, so its 81.54% was measured with dropout on and
BatchNorm normalizing each batch of 64 by that batch's own statistics. We measure (and serve)
in eval mode, with BatchNorm's running statistics: averages over the last few dozen training
batches, taken while the weights moved. At the `seed` recipe's constant learning rate the
weights never settle, and its final weights tested 1.3-3.3 points below its best-validation
weights (README, "Training results").
This tells how much of that is the running statistics lagging the final weights:

- eval mode: running statistics, no dropout (as training reports, and as the service predicts);
- each test batch's own statistics (64 images, shuffled), no dropout;
- the notebook's way: train mode, dropout on, batch statistics (64 images, shuffled);
- running statistics recomputed over the training images with the final weights (a cumulative
  average, BatchNorm's momentum=None), then eval mode.

Prints a table (validation and test top-1, and the difference from eval mode); --json-out
writes it as JSON. The checkpoint itself is not changed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench.cli import one_line_errors, write_json_atomic
from training.artifact import checkpoint_for_inference
from training.checkpoint import load_checkpoint_and_digest
from training.data import Split, load_data
from training.engine import Precision, forward_logits
from training.errors import check_output_file
from training.model import use_space_to_depth
from training.preprocess import InputTransform
from training.runtime import resolve_device

BATCH = 64  # the notebook's batch, for the modes that normalize by a batch's statistics


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    transform: InputTransform,
    split: Split,
    precision: Precision,
    batch: int,
    seed: int = 0,
) -> float:
    """Top-1 (percent) of `model` as it is set (train or eval mode) over `split`, in batches of
    `batch`, in a shuffled order (the notebook's test loader shuffles; it matters only when a
    batch's statistics are used)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    # The predictions come back to the CPU; so do the labels, once: compared on the split's
    # device (CUDA, as main moves it), the two were on different devices and the GPU run failed.
    images, labels = split.images[order], split.labels[order].cpu()
    correct = 0
    for start in range(0, len(split), batch):
        logits = forward_logits(model, transform, images[start : start + batch], precision)
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch]).sum())
    return correct / max(1, len(split)) * 100


@torch.no_grad()
def recalibrate(
    model: nn.Module, transform: InputTransform, images: torch.Tensor, precision: Precision
) -> None:
    """Replace BatchNorm's running statistics by their average over `images` (batches of 500)
    with the model's current weights."""
    for bn in batch_norms(model):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()  # dropout comes after every BatchNorm: it does not change their inputs
    for start in range(0, len(images), 500):
        forward_logits(model, transform, images[start : start + 500], precision)
    model.eval()


def modes(
    train_images: torch.Tensor, transform: InputTransform, precision: Precision
) -> list[tuple[str, int, Callable[[nn.Module], None]]]:
    """(name, batch size, how to set a fresh copy of the model) for each mode."""

    def batch_statistics(model: nn.Module) -> None:
        model.eval()
        for bn in batch_norms(model):
            bn.train()

    def recalibrated(model: nn.Module) -> None:
        recalibrate(model, transform, train_images, precision)

    return [
        ("eval mode: running statistics (as reported and served)", 500, lambda m: m.eval()),
        (f"each batch's own statistics, {BATCH} images, no dropout", BATCH, batch_statistics),
        (f"the notebook's: train mode, dropout on, batch statistics, {BATCH} images", BATCH,
         lambda m: m.train()),
        (f"running statistics recomputed over {len(train_images):,} training images", 500,
         recalibrated),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bn_modes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=Path, help="a last.pt or best.pt of training.run")
    parser.add_argument("--data-dir", type=Path, help="image-folder tree (else the download)")
    parser.add_argument("--download-root", type=Path, default=Path("data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with one_line_errors():  # a missing or foreign checkpoint, no CUDA, no data: one line
        if args.json_out:
            check_output_file("--json-out", args.json_out)
        device = resolve_device(args.device)
        ckpt, digest = load_checkpoint_and_digest(args.checkpoint)
        loaded = checkpoint_for_inference(ckpt, digest, args.checkpoint)
        config = ckpt["config"]  # the run's own validation split
        data = load_data(
            args.data_dir,
            args.download_root,
            valid_size=config["valid_size"],
            split_seed=config["split_seed"],
        )
    cuda = device.type == "cuda"
    # As training runs: fp32 weights, bf16 autocast and channels_last on CUDA.
    precision = Precision(torch.bfloat16 if cuda else None, channels_last=cuda)
    base = loaded.model.to(device, memory_format=torch.channels_last if cuda else None)
    use_space_to_depth(base, cuda)
    transform = InputTransform(loaded.preprocessing).to(device)
    train_images = data.train.images.to(device)
    valid, test = data.valid.to(device), data.test.to(device)
    rows = []
    for name, batch, set_up in modes(train_images, transform, precision):
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # dropout's masks, in the notebook's mode
        set_up(model)
        row = {
            "mode": name,
            "valid": accuracy(model, transform, valid, precision, batch),
            "test": accuracy(model, transform, test, precision, batch),
        }
        print(f"{name}: valid {row['valid']:.2f}%, test {row['test']:.2f}%", file=sys.stderr)
        rows.append(row)
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.checkpoint} (epoch {ckpt['epoch']}, recipe {ckpt['recipe']}), {device_name}\n")
    print("| BatchNorm and dropout | validation top-1 | vs eval mode | test top-1 | vs eval mode |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['valid']:.2f}% | {row['valid'] - rows[0]['valid']:+.2f} | "
            f"{row['test']:.2f}% | {row['test'] - rows[0]['test']:+.2f} |"
        )
    if args.json_out:
        report = {
            "device": device_name,
            "checkpoint": str(args.checkpoint),
            "epoch": ckpt["epoch"],
            "recipe": ckpt["recipe"],
            "rows": rows,
        }
        write_json_atomic(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
