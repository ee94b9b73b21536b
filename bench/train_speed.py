"""Training throughput: the notebook's input pipeline against ours, on the same device, same run.

    python -m bench.train_speed --data-dir DIR [--device cuda] [--steps 100]

Rows (all train AlexNet with SGD on real CIFAR-10 batches; time per optimizer step):
- notebook: torchvision CIFAR-style dataset, PIL Resize(227) + ToTensor + Normalize per image,
  DataLoader(batch 64, SubsetRandomSampler, num_workers=0), fp32 - the notebook's own code path;
- ours: data resident on the device as uint8; gather, augment, resize and normalize there;
  then, a row each, bf16 autocast and channels_last, the whole step captured as a CUDA graph,
  conv1 in its space-to-depth form, max-pool before ReLU (the last row: as training runs).
Prints a table with ms/step, steps/s, images/s, seconds per epoch and the speed-up over the
notebook, and writes it as JSON with --json-out.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler
from torchvision import transforms

from bench.cli import (
    non_negative_int,
    one_line_errors,
    positive_int,
    positive_ints,
    write_json_atomic,
)
from training.data import Split, batch_slices, epoch_order, load_data
from training.engine import Precision, TrainStep
from training.errors import check_output_file
from training.model import AlexNet, AlexNetConfig, use_pool_first, use_space_to_depth
from training.preprocess import CIFAR10_MEAN, CIFAR10_STD, InputTransform
from training.runtime import resolve_device


@dataclass
class Row:
    pipeline: str
    batch: int
    ms_per_step: float
    steps_per_epoch: int

    @property
    def steps_per_s(self) -> float:
        return 1000.0 / self.ms_per_step

    @property
    def images_per_s(self) -> float:
        return self.batch * self.steps_per_s

    @property
    def s_per_epoch(self) -> float:
        return self.steps_per_epoch * self.ms_per_step / 1000.0


class NotebookDataset(Dataset):
    """What torchvision's CIFAR10 does per item: HWC uint8 -> PIL image -> transform."""

    def __init__(self, split: Split, transform: transforms.Compose) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_notebook(train: Split, device: torch.device, steps: int, warmup: int) -> Row:
    """The notebook's cells 5-8, timed over `steps` optimizer steps."""
    transform = transforms.Compose([
        transforms.Resize((227, 227)),
        transforms.ToTensor(),
        transforms.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD),
    ])  # fmt: skip
    loader = DataLoader(
        NotebookDataset(train, transform),
        batch_size=64,
        sampler=SubsetRandomSampler(range(len(train))),
    )
    model = AlexNet(AlexNetConfig()).to(device)
    use_pool_first(model, False)  # the notebook's Conv-BN-ReLU-MaxPool, as written
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, weight_decay=0.005, momentum=0.9)

    def endless():  # epochs back to back, as the notebook's loop does
        while True:
            yield from loader

    batches = endless()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss.item()  # the notebook prints the loss; this also waits for the GPU
    ms = (time.perf_counter() - start) * 1000 / steps
    return Row("notebook: PIL per image, fp32, batch 64", 64, ms, len(loader))


def build_step(
    train: Split,
    device: torch.device,
    *,
    batch: int,
    augment: str,
    precision: Precision,
    graph: bool,
    space_to_depth: bool = True,
    pool_first: bool = True,
    early_sgd: bool = False,
) -> TrainStep:
    """A fresh model's training step as the trainer builds it (label smoothing with the
    augmentation, as recipe `fast`; none without, as `seed`), captured as a CUDA graph if asked;
    shared with bench.profile_step. Not the recipes in every detail: SGD here is the same for
    both (weight decay 5e-4, no Nesterov; neither changes a step's time), and the callers turn
    cuDNN autotuning on, which `fast` leaves off (its epochs run about 5% slower for it)."""
    model = AlexNet(AlexNetConfig()).to(
        device, memory_format=torch.channels_last if precision.channels_last else None
    )
    use_space_to_depth(model, space_to_depth)
    use_pool_first(model, pool_first)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=torch.tensor(0.005, device=device) if graph else 0.005,
        momentum=0.9,
        weight_decay=5e-4,
        fused=device.type == "cuda",
    )
    step = TrainStep(
        model,
        InputTransform().to(device),
        optimizer,
        train,
        local_batch_size=batch,
        label_smoothing=0.1 if augment != "none" else 0.0,
        augment=augment,
        crop_padding=4,
        precision=precision,
        early_sgd=model.head_parameters() if early_sgd else None,
    )
    if graph:
        step.capture_graph(model)
    return step


def bench_ours(
    train: Split,
    device: torch.device,
    *,
    batch: int,
    augment: str,
    precision: Precision,
    graph: bool,
    space_to_depth: bool,
    pool_first: bool,
    steps: int,
    warmup: int,
) -> Row:
    torch.manual_seed(0)
    step = build_step(
        train, device, batch=batch, augment=augment, precision=precision, graph=graph,
        space_to_depth=space_to_depth, pool_first=pool_first,
    )  # fmt: skip
    order = epoch_order(len(train), 0, 0, device)
    batches = batch_slices(order, batch)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step(batches[i % len(batches)])
    step.loss_sum.item()
    ms = (time.perf_counter() - start) * 1000 / steps
    parts = ["ours: GPU-resident uint8"]
    parts.append("bf16" if precision.amp_dtype else "fp32")
    if precision.channels_last:
        parts.append("channels_last")
    if augment != "none":
        parts.append(augment)
    if space_to_depth:
        parts.append("conv1 space-to-depth")
    if pool_first:
        parts.append("pool before ReLU")
    parts.append("CUDA graph" if graph else "eager")
    return Row(", ".join(parts) + f", batch {batch}", batch, ms, len(train) // batch)


def json_row(row: Row, baseline: Row) -> dict:
    """A row of the table as JSON: every figure the printed table shows."""
    return {
        **row.__dict__,
        "steps_per_s": row.steps_per_s,
        "images_per_s": row.images_per_s,
        "s_per_epoch": row.s_per_epoch,
        "images_per_s_vs_notebook": row.images_per_s / baseline.images_per_s,
    }


def table(rows: list[Row], baseline: Row, device_name: str) -> str:
    head = (
        f"device: {device_name}\n\n"
        "| pipeline | ms/step | steps/s | images/s | s/epoch | 20 epochs (s) | images/s vs notebook |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r.pipeline} | {r.ms_per_step:.2f} | {r.steps_per_s:.1f} | {r.images_per_s:,.0f} | "
        f"{r.s_per_epoch:.2f} | {20 * r.s_per_epoch:.1f} | {r.images_per_s / baseline.images_per_s:.1f}x |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data-dir", type=Path, help="image-folder CIFAR-10 copy (else the download)"
    )
    parser.add_argument("--download-root", type=Path, default=Path("data"))
    parser.add_argument("--device", default="auto")
    # All checked before the notebook baseline runs: `--batches 64,2S6` threw its measured
    # rows away with a ValueError, `--steps 0` failed with UnboundLocalError.
    parser.add_argument("--steps", type=positive_int, default=100, help="timed steps per row")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="untimed steps per row")
    parser.add_argument(
        "--notebook-steps",
        type=positive_int,
        default=None,
        help="timed steps of the notebook row (default --steps)",
    )
    parser.add_argument(
        "--batches", type=positive_ints, default=[64, 256, 512], help="batch sizes of our rows"
    )
    parser.add_argument(
        "--only-best", action="store_true", help="only our fastest variant per batch size"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with one_line_errors():  # no CUDA, no data, an unwritable --json-out: one line
        if args.json_out:
            check_output_file("--json-out", args.json_out)
        device = resolve_device(args.device)
        data = load_data(args.data_dir, args.download_root, valid_size=0.1, split_seed=1)
    too_large = [b for b in args.batches if b > len(data.train)]
    if too_large:  # bench_ours steps through whole batches of the split: it needs one at least
        parser.error(
            f"--batches {','.join(map(str, too_large))}: larger than the "
            f"{len(data.train):,} training images"
        )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True

    baseline = bench_notebook(data.train, device, args.notebook_steps or args.steps, args.warmup)
    rows = [baseline]
    print(f"{baseline.pipeline}: {baseline.ms_per_step:.2f} ms/step", file=sys.stderr)
    gpu_train = data.train.to(device)
    fast = Precision(torch.bfloat16 if cuda else None, channels_last=cuda)
    for batch in args.batches:
        augment = "none" if batch == 64 else "crop-flip"  # 64: the seed recipe; larger: fast
        # Each row adds one change to the one before; the last is the step as training runs it.
        variants = [(Precision(None, False), False, False, False)]
        if cuda:  # on a CPU the other rows would repeat this one
            variants += [
                (fast, False, False, False),
                (fast, True, False, False),
                (fast, True, True, False),
                (fast, True, True, True),
            ]
        else:
            variants += [(Precision(None, False), False, False, True)]
        if args.only_best:
            variants = variants[-1:]
        for precision, graph, s2d, pool_first in variants:
            row = bench_ours(gpu_train, device, batch=batch, augment=augment, precision=precision,
                             graph=graph, space_to_depth=s2d, pool_first=pool_first,
                             steps=args.steps, warmup=args.warmup)  # fmt: skip
            print(f"{row.pipeline}: {row.ms_per_step:.2f} ms/step", file=sys.stderr)
            rows.append(row)
    text = table(rows, baseline, name)
    print(text)
    if args.json_out:
        write_json_atomic(args.json_out, {
            "device": name,
            "torch": str(torch.__version__),
            "rows": [json_row(r, baseline) for r in rows],
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
