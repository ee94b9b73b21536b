"""Where and how the code runs: device choice, precision, and the torchrun/DDP environment."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.device_names import CUDA_DEVICE
from training.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`; a clear error when CUDA is absent."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if re.fullmatch(CUDA_DEVICE, spec):  # checked first: torch.device raises on 'cuda:x'
        if not torch.cuda.is_available():
            raise UserError(
                f"device {spec!r} asked for, but CUDA is not available "
                f"(torch {torch.__version__}); use cpu or auto"
            )
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {spec!r} asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        return device
    raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job if any (NCCL on CUDA, gloo on CPU); pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device_spec)
    info = Distributed(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_spec)
    if device.type == "cuda":
        if torch.cuda.device_count() < world_size:
            raise UserError(
                f"torchrun started {world_size} processes but only "
                f"{torch.cuda.device_count()} GPU(s) are visible; lower --nproc_per_node"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
