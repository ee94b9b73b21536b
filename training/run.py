"""python -m training.run: train AlexNet on CIFAR-10 (recipe `seed` reproduces the notebook).

python -m training.run                              # the notebook's run, CIFAR-10 download
python -m training.run --recipe fast --data-dir DIR # our fast recipe on an image-folder copy
python -m training.run --resume runs/fast-.../last.pt
torchrun --nproc_per_node=N -m training.run --recipe fast   # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import fields

from training.cli_args import path_arg
from training.errors import UserError
from training.interrupts import exit_status, stop_status, stops_held
from training.recipes import RECIPES, TrainConfig, make_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.run",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Recipe values: "
        + "; ".join(
            f"{name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
            for name, values in RECIPES.items()
        ),
    )
    parser.add_argument(
        "--recipe", choices=sorted(RECIPES), default=None, help="named recipe (default: seed)"
    )
    parser.add_argument(
        "--resume", type=path_arg, default=None, help="continue the run whose last.pt this is"
    )
    parser.add_argument(
        "--restart-best",
        action="store_true",
        help="with --resume, when the run's best.pt is lost or unreadable: continue anyway; "
        "best.pt then holds the best of the epochs from last.pt's on (when the best epoch is "
        "last.pt's own, best.pt is rebuilt from it without this flag)",
    )
    for f in fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        per_recipe = ", ".join(f"{r}: {v.get(f.name, f.default)}" for r, v in RECIPES.items())
        kwargs: dict = {"default": None, "help": f"{f.metadata['help']} ({per_recipe})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type in ("int",):
            kwargs["type"] = int
        elif f.type in ("float",):
            kwargs["type"] = float
        elif "Path" in str(f.type):
            kwargs["type"] = path_arg
        parser.add_argument(flag, **kwargs)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, a batch scheduler's preemption), stopping the run as Ctrl-C
    does: the checkpoint being written still reaches the disk, and the resume hint is shown."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.restart_best and args.resume is None:  # before PyTorch loads: a second at least
        print("error: --restart-best goes with --resume", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
    )
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "recipe"}
    explicit = {k for k, v in values.items() if v is not None} | (
        {"recipe"} if args.recipe else set()
    )
    with stops_held() as stops:
        from training.trainer import train  # deferred: --help stays fast
    if stops:  # stopped before anything ran: nothing to resume
        return stop_status(stops[0])

    # By default SIGTERM ends the process at once: a last.pt being written on the background
    # thread was lost with it (a run stopped early in epoch 2 kept no resumable checkpoint).
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        config = make_config(args.recipe or "seed", **values)
        train(config, resume=args.resume, explicit=explicit, restart_best=args.restart_best)
    except (UserError, OSError) as exc:  # OSError: the reports on a full disk, a read-only folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        return stop_status(signal.SIGTERM)
    except KeyboardInterrupt:
        return stop_status(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
