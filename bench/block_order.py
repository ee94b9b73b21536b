"""Max-pool before ReLU against the notebook's order, as served: the predictor's forward pass
on the shipped weights, both orders in one process, side by side.

    python -m bench.block_order [--checkpoint weights] [--device auto] [--precision auto]
                                [--batches 1,8,32] [--rounds 20]

Each round times one batch in each order, the two in turns (ABBA), so the drift of a shared
CPU falls on both alike. Prints a table of median ms per batch, images/s and their ratio, and
whether the two orders gave the same probabilities, bit for bit. (The training step's two
orders are timed on a GPU by bench.profile_step and bench.train_speed.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from app.predictor import Predictor
from bench.cli import positive_int, positive_ints
from bench.model_alone import add_model_arguments, served_predictor
from training.model import use_pool_first

ORDERS = {"notebook order (ReLU, then max-pool)": False, "max-pool before ReLU (ours)": True}


def seconds(predictor: Predictor, images: torch.Tensor) -> float:
    start = time.perf_counter()
    predictor.predict(images)  # returns on the CPU: the device has finished
    return time.perf_counter() - start


def compare(predictor: Predictor, batch: int, rounds: int) -> tuple[dict[str, float], bool]:
    """Median seconds per batch in each order, and whether both gave the same output."""
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    model = predictor.loaded.model
    outputs = {}
    for name, pool_first in ORDERS.items():
        use_pool_first(model, pool_first)
        outputs[name] = predictor.predict(images)  # also the warm-up of this shape
    times: dict[str, list[float]] = {name: [] for name in ORDERS}
    for r in range(rounds):
        names = list(ORDERS) if r % 2 == 0 else list(reversed(ORDERS))
        for name in names:
            use_pool_first(model, ORDERS[name])
            times[name].append(seconds(predictor, images))
    use_pool_first(model, True)
    first, second = outputs.values()
    return {name: statistics.median(t) for name, t in times.items()}, torch.equal(first, second)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.block_order", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("--batches", type=positive_ints, default=[1, 8, 32])
    parser.add_argument("--rounds", type=positive_int, default=20, help="timed batches per order")
    args = parser.parse_args(argv)
    batches = args.batches
    predictor = served_predictor(args, batches)
    device = predictor.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} ({torch.get_num_threads()} threads), {predictor.precision}, "
          f"torch {torch.__version__}, {args.rounds} rounds\n")  # fmt: skip
    notebook, ours = ORDERS
    print(f"| batch | {notebook}, ms | {ours}, ms | images/s, notebook order | images/s, ours "
          "| ours vs notebook | same output |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for batch in batches:
        medians, same = compare(predictor, batch, args.rounds)
        a, b = medians[notebook], medians[ours]
        print(f"| {batch} | {a * 1000:.2f} | {b * 1000:.2f} | {batch / a:.1f} | {batch / b:.1f} "
              f"| {a / b:.3f}x | {'yes' if same else 'NO'} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
