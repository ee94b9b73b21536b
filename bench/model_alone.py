"""The model alone (no HTTP): the serving predictor's forward pass, timed per batch size.

    python -m bench.model_alone [--checkpoint weights] [--device auto] [--threads N]
                                [--batches 1,8,32] [--seconds 3] [--procs P]

Prints one JSON object: the device, the precision (with `--precision auto` on a CPU, the one the
service's warm-up would choose), and per batch size the median milliseconds per batch and the
images/s. With `--procs P`, P processes run the same loop at the same time (as P server workers
would) and the images/s are their sum. bench.serve_load runs this before every load level and
after the last, so each row's baseline is measured next to it: on shared CPUs the model's own
speed drifts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from app.predictor import load_predictor


def time_batches(
    checkpoint: Path, device: str, precision: str, batches: list[int], seconds: float
) -> dict:
    predictor = load_predictor(checkpoint, device, precision)
    predictor.warm_up(
        max(batches), choose_precision=precision == "auto" and predictor.device.type == "cpu"
    )
    rows = {}
    for batch in batches:
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        predictor.predict(images)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 5:
            start = time.perf_counter()
            predictor.predict(images)
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1000
        rows[batch] = {"ms": ms, "images_per_s": batch / (ms / 1000)}
    name = (
        torch.cuda.get_device_name(predictor.device) if predictor.device.type == "cuda" else "cpu"
    )
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "precision": predictor.precision,
        "batches": rows,
    }


def measure(
    checkpoint: Path,
    device: str,
    precision: str,
    batches: list[int],
    seconds: float,
    threads: int | None = None,
    procs: int = 1,
) -> dict:
    """Run `procs` fresh processes at once; images/s summed, ms per batch averaged."""
    cmd = [
        sys.executable, "-m", "bench.model_alone", "--checkpoint", str(checkpoint),
        "--device", device, "--precision", precision, "--seconds", str(seconds),
        "--batches", ",".join(map(str, batches)), *(["--threads", str(threads)] if threads else []),
    ]  # fmt: skip
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    results = []
    for proc in running:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        results.append(json.loads(out))
    combined = {}
    for batch in batches:
        per = [r["batches"][str(batch)] for r in results]
        combined[batch] = {
            "ms": statistics.mean(p["ms"] for p in per),
            "images_per_s": sum(p["images_per_s"] for p in per),
        }
    return {
        "device": results[0]["device"],
        "threads": results[0]["threads"],
        "precision": results[0]["precision"],
        "procs": procs,
        "batches": combined,
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """What is served, and how: shared by this tool and bench.serve_load."""
    parser.add_argument("--checkpoint", type=Path, default=Path("weights"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.model_alone", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    parser.add_argument("--procs", type=int, default=1, help="processes running at once")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.procs > 1:
        result = measure(
            args.checkpoint, args.device, args.precision, batches, args.seconds,
            args.threads, args.procs,
        )  # fmt: skip
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = time_batches(args.checkpoint, args.device, args.precision, batches, args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
