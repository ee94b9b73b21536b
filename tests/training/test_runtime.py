"""Device choice and the torchrun environment: the GPU-count checks, with CUDA faked on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.cpus import available_cpus
from training.errors import UserError
from training.runtime import init_distributed, resolve_device


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_spellings_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=r"CUDA is not available.*use cpu or auto"):
            resolve_device(spec)
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_device_spellings_with_two_gpus(two_gpus: None) -> None:
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"'cuda:2' asked for, but only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    for spec in (
        "cuda:abc",
        "cuda:",
        "cuda:-1",
        "cudax",
        "cuda:01",
        "cuda:\u0661",
        "cuda:99999",
    ):  # torch.device raised on the first
        with pytest.raises(UserError, match=f"unknown device '{spec}'; use auto, cpu, cuda or"):
            resolve_device(spec)


def test_more_torchrun_processes_than_gpus_is_a_clear_error(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"started 4 processes but only 2 GPU.*--nproc_per_node"):
        init_distributed("auto")


def test_alone_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, device = init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    assert device == torch.device("cpu")


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), (None, None)],
    ids=["no-quota", "1.5-cpus", "half-a-cpu", "no-cgroup-file"],
)
def test_available_cpus_follow_a_container_quota(
    tmp_path: Path, cpu_max: str | None, cap: int | None
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    allowed = len(os.sched_getaffinity(0))
    expected = allowed if cap is None else min(allowed, cap)
    assert available_cpus(path) == expected
