"""The model alone (no HTTP): the serving predictor's forward pass, timed per batch size.

    python -m bench.model_alone [--checkpoint weights] [--device auto] [--threads N]
                                [--batches 1,8,32] [--seconds 3] [--procs P]

Prints one JSON object: the device, the precision (with `--precision auto` on a CPU, the one the
service's warm-up would choose), and per batch size the median milliseconds per batch and the
images/s. With `--procs P`, P processes run the same loop at the same time (as P server workers
would) and the images/s are their sum.

bench.serve_load keeps such processes resident (`Resident`): loaded and warmed up once, they
time the model on request in the seconds right after each load window, because on shared CPUs
the model's own speed drifts by 2x and more within seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import torch

from app.predictor import Predictor, load_predictor
from bench.cli import fail, positive_int, positive_ints
from training.errors import UserError


def _time(predictor: Predictor, batches: list[int], seconds: float) -> dict[int, dict]:
    """Median ms per batch and images/s, for each batch size in turn."""
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
    return rows


class Resident:
    """`procs` processes, each loaded and warmed up once, that time the model together on each
    `time()` call: the images/s are their sum, the ms per batch their mean."""

    def __init__(
        self,
        checkpoint: Path,
        device: str,
        precision: str,
        batches: list[int],
        threads: int | None = None,
        procs: int = 1,
    ) -> None:
        self.batches, self.procs = batches, procs
        cmd = [
            sys.executable, "-m", "bench.model_alone", "--resident", "--checkpoint", str(checkpoint),
            "--device", device, "--precision", precision, "--batches", ",".join(map(str, batches)),
            *(["--threads", str(threads)] if threads else []),
        ]  # fmt: skip
        self._cmd = " ".join(cmd)
        self._running = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(procs)
        ]
        # Each child prints what it serves once loaded: device, threads, precision.
        infos = [self._answer(p) for p in self._running]
        self.info = infos[0]

    def _answer(self, proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            self.close()
            code = proc.wait()
            if code == 2:  # its own one-line error (a bad --checkpoint, no CUDA) is above:
                raise SystemExit(2)  # a second line would only repeat that it failed
            raise SystemExit(f"error: the timing process exited with code {code}")
        return json.loads(line)

    def time(self, seconds: float) -> dict:
        for proc in self._running:  # all start at once, as server workers would run
            assert proc.stdin is not None
            proc.stdin.write(f"{seconds}\n")
            proc.stdin.flush()
        results = [self._answer(p)["batches"] for p in self._running]
        combined = {}
        for batch in self.batches:
            per = [r[str(batch)] for r in results]
            combined[batch] = {
                "ms": statistics.mean(p["ms"] for p in per),
                "images_per_s": sum(p["images_per_s"] for p in per),
            }
        return {**self.info, "procs": self.procs, "batches": combined}

    def close(self) -> None:
        for proc in self._running:
            if proc.stdin and not proc.stdin.closed:
                proc.stdin.close()  # end of input: the child exits
        for proc in self._running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Resident:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def measure(
    checkpoint: Path,
    device: str,
    precision: str,
    batches: list[int],
    seconds: float,
    threads: int | None = None,
    procs: int = 1,
) -> dict:
    """Time the model once in `procs` fresh processes running at the same time."""
    with Resident(checkpoint, device, precision, batches, threads, procs) as resident:
        return resident.time(seconds)


def served_predictor(args: argparse.Namespace, batches: list[int]) -> Predictor:
    """The predictor of `add_model_arguments`' options, loaded and warmed up as the service
    would (on a CPU with --precision auto, in the faster precision); a one-line exit if the
    checkpoint or the device is wrong. Shared with bench.block_order."""
    try:
        predictor = load_predictor(args.checkpoint, args.device, args.precision)
    except UserError as exc:  # a missing or foreign checkpoint, CUDA asked for and absent
        fail(str(exc))  # status 2: Resident's parent knows the reason was said
    choose = args.precision == "auto" and predictor.device.type == "cpu"
    predictor.warm_up(max(batches), choose_precision=choose)
    return predictor


def _serve_timings(args: argparse.Namespace, batches: list[int]) -> None:
    """The child of `Resident`: load, say what is served, then time on each line of input."""
    predictor = served_predictor(args, batches)
    device = predictor.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"device": name, "threads": torch.get_num_threads(), "precision": predictor.precision}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        print(json.dumps({"batches": _time(predictor, batches, float(line))}), flush=True)


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
    parser.add_argument("--batches", type=positive_ints, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per batch size")
    parser.add_argument(
        "--threads", type=positive_int, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument("--procs", type=positive_int, default=1, help="processes running at once")
    parser.add_argument("--resident", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds < 0:
        parser.error(f"--seconds {args.seconds:g}: must be 0 or more")
    batches = args.batches
    if args.resident:
        if args.threads:
            torch.set_num_threads(args.threads)
        _serve_timings(args, batches)
        return 0
    result = measure(
        args.checkpoint, args.device, args.precision, batches, args.seconds, args.threads, args.procs
    )  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
