"""A whole training run: data on the device, the epoch loop, checkpoints, reports, resume, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import report
from training.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriter,
    half_written,
    library_versions,
    load_checkpoint,
    model_section,
    to_cpu,
)
from training.data import Data, batch_slices, epoch_order, load_data
from training.engine import Precision, TrainStep, evaluate
from training.errors import UserError, refuse_a_dangling_link
from training.folders import class_difference
from training.interrupts import stops_held
from training.model import AlexNet, AlexNetConfig, use_space_to_depth
from training.preprocess import InputTransform, Preprocessing
from training.recipes import TrainConfig
from training.resume import load_resume
from training.runlock import run_lock
from training.runtime import Distributed, init_distributed, shutdown_distributed
from training.warmup import warm_up

log = logging.getLogger(__name__)


@dataclass
class TrainHooks:
    """Optional callbacks, e.g. for custom logging: after each step and after each epoch."""

    on_step: Callable[[int, int], None] | None = None  # (epoch, step), both 1-based
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None  # (epoch, metrics)


@dataclass
class RunResult:
    out_dir: Path
    last: Path
    best: Path
    metrics: list[dict[str, Any]]
    test: dict[str, Any]  # of the final weights
    best_test: dict[str, Any]  # of the best-validation weights
    train_seconds: float  # epochs incl. validation, this process only


def _precision(cfg: TrainConfig, device: torch.device) -> Precision:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    return Precision(torch.bfloat16 if bf16 else None, channels_last)


def _count(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs': tiny runs (1 epoch of 1 step) are common in tests and smoke runs."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Diverged(UserError):
    """The loss is no longer a number: resuming would only repeat it."""


def _use_graphs(cfg: TrainConfig, device: torch.device, dist_info: Distributed) -> bool:
    if cfg.cuda_graphs is None:
        return device.type == "cuda" and not dist_info.enabled
    if cfg.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device; drop it or use --device cuda")
    if cfg.cuda_graphs and dist_info.enabled:
        raise UserError("--cuda-graphs is single-GPU only; drop it under torchrun")
    return cfg.cuda_graphs


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG (augmentation, dropout) is reseeded from (seed, epoch, rank) at every
    epoch, so a resumed run draws exactly what an uninterrupted one would, on any GPU count."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank + 7


def _set_lr(group: dict[str, Any], value: float, as_tensor: bool, device: torch.device) -> None:
    # A CUDA graph reads the learning rate from device memory; eager code takes a float.
    group["lr"] = torch.tensor(value, device=device) if as_tensor else value


@contextmanager
def _deaf_to_stops() -> Iterator[None]:
    """Ctrl-C (again) and SIGTERM wait while the queued checkpoints reach the disk. A second
    Ctrl-C used to end the process in the middle of writing last.pt ('terminate called without
    an active exception'): the epoch just finished was lost, and a half-written temp file left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    told = []

    def wait(signum: int, frame: object) -> None:
        if not told:
            told.append(signum)
            log.warning("writing the last checkpoint before stopping; a moment")

    previous = {sig: signal.signal(sig, wait) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stops_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM inside the block take effect at its end: the epoch's best.pt and
    last.pt are queued together. A stop between the two used to leave a first epoch's best.pt
    without a last.pt: nothing to resume, and a folder the same command then refused."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with stops_held() as stops:
        yield
    if stops:
        signal.raise_signal(stops[0])  # to the handler it would have reached


RUNS = Path("runs")  # where a run without --out-dir gets its folder


def _default_out_dir(cfg: TrainConfig) -> Path:
    return RUNS / f"{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}"


RUN_FILES = ("best.pt", "metrics.jsonl", "summary.json", "curves.png", "confusion.png")


def _check_writable(out_dir: Path) -> None:
    """Create `out_dir` and write a file in it, or a one-line error naming --out-dir."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write to {out_dir}: {exc.strerror or exc}; choose another --out-dir"
        ) from None


def _check_creatable(out_dir: Path) -> None:
    """`_check_writable`'s verdict before the data is decoded, without creating the folder: a
    run that then fails to load its data leaves no empty run folder behind."""
    if out_dir.is_dir():
        _check_writable(out_dir)  # a probe file, removed again
        return
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        problem = "Read-only file system" if read_only else "Permission denied"
    else:
        return
    raise UserError(f"cannot write to {out_dir}: {problem}; choose another --out-dir")


def _check_same_data(data: Data, ckpt: dict[str, Any], resume: Path | None) -> None:
    """UserError unless `data` has the classes and training-image count the run started with.
    Only the classes that differ are named: both lists in full hid the one that mattered."""
    differences = []
    if data.classes != ckpt["classes"]:
        differences.append(
            class_difference(data.classes, "the data", list(ckpt["classes"]), "the run")
        )
    if len(data.train) != ckpt["data"]["train"]:
        differences.append(
            f"the data has {len(data.train)} training images, the run had {ckpt['data']['train']}"
        )
    if differences:
        raise UserError(
            f"the data is not what {resume} was trained on: {'; '.join(differences)}; resume "
            "with the data it was trained on (--data-dir DIR), or start a new run"
        )


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """What changes whenever `path` is rewritten: checkpoints are renamed into place, so a new
    write is a new inode (and usually a new size and time). None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _new_run_folder(base: Path) -> Path:
    """`base`, or `base`-2, -3, ...: the first that this call creates. Runs started in the same
    second (a sweep launched in parallel) each get a folder; they used to share one, and all
    but the first were refused as 'in use by another training process'."""
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:  # not writable: _check_writable says so, naming the folder
            pass
        return candidate
    raise UserError(f"{base}-2 ... -999 all exist; choose an --out-dir")


def _refuse_a_used_out_dir(out_dir: Path) -> None:
    """UserError if a new run's --out-dir holds another run's files. Checked before the data
    is decoded (minutes for a large set) and again after, when the folder is taken."""
    last = out_dir / "last.pt"
    if last.exists():
        try:
            finished = load_checkpoint(last).get("test") is not None
        except CheckpointError:
            finished = False  # a resume says what is wrong with it
        if finished:  # "continue it with --resume" led to "nothing to resume"
            raise UserError(f"{out_dir} already holds a finished run; choose another --out-dir")
        raise UserError(
            f"{out_dir} already holds a run; continue it with --resume {shlex.quote(str(last))} "
            "or choose another --out-dir"
        )
    written = [n for n in RUN_FILES if (out_dir / n).exists()]
    # A process killed mid-write leaves a hidden temp file (up to a checkpoint's size):
    # named too, or removing the listed files would leave it behind unseen.
    written += [p.name for p in half_written(out_dir)]
    if written:
        raise UserError(
            f"{out_dir} already holds files of another run ({', '.join(written)}); "
            "choose another --out-dir or remove them"
        )


def _check_out_dir_before_decoding(
    cfg: TrainConfig, resume: Path | None, dist_info: Distributed
) -> None:
    """A new run's folder that cannot be used, refused before the data is decoded (minutes for
    a large set); the folder's mkdir would only have said "File exists"."""
    out = cfg.out_dir if resume is None else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is a file; choose a folder")
    if out is not None:
        refuse_a_dangling_link("--out-dir", out)
    if out is not None and not dist_info.enabled:  # under torchrun: later, rank 0's verdict
        _refuse_a_used_out_dir(out)  # now, and again once the folder is settled
        _check_creatable(out)  # a read-only disk, a parent that is a file
    if resume is None and cfg.out_dir is None and not dist_info.enabled:
        # The default folder's place: ./runs a file, or read-only (it was found after decoding).
        _check_creatable(_default_out_dir(cfg))


def _choose_out_dir(cfg: TrainConfig, resume: Path | None, dist_info: Distributed) -> Path:
    if resume is not None:
        out_dir = resume.parent
    elif cfg.out_dir is not None:
        out_dir = cfg.out_dir
        _refuse_a_used_out_dir(out_dir)
    else:
        out_dir = _default_out_dir(cfg)
        if dist_info.is_main:  # the other ranks take rank 0's folder, below
            out_dir = _new_run_folder(out_dir)
    if dist_info.enabled:  # every rank must agree on one folder (timestamps may differ)
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        out_dir = Path(box[0])
    return out_dir


def _draw_figures(figures: dict[str, Callable[[Path], None]], out_dir: Path) -> list[str]:
    """Draw each figure into out_dir; the names of those drawn. A figure that matplotlib fails
    to draw is a warning: it raised after the test evaluation, before summary.json and the
    final last.pt, so the run could never finish (a resume drew it again, and failed again).
    A full or read-only disk (OSError) still stops the run, which says so."""
    drawn = []
    for name, draw in figures.items():
        try:
            draw(out_dir / name)
        except OSError:
            raise
        except Exception as exc:
            detail = (str(exc).splitlines() or [""])[0]
            log.warning(
                "%s not drawn (%s: %s); the run's results are in summary.json",
                name, type(exc).__name__, detail,
            )  # fmt: skip
            continue
        drawn.append(name)
    return drawn


def _stop_on_rank_0s_verdict(problem: str | None, dist_info: Distributed) -> None:
    """UserError(problem) on every rank when rank 0, which alone checks and locks the run
    folder, found one: the other ranks used to train on and die with a gloo traceback once rank
    0 had left. Every rank must call it at the same point."""
    if dist_info.enabled:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
        if problem is not None:
            # Every rank leaves here, straight into destroy_process_group, which on PyTorch
            # 2.4 and 2.5 (not 2.11 or 2.14) could deadlock: it joins gloo's worker thread
            # holding the GIL while the worker, freeing the broadcast's tensors, waits for the
            # GIL. The rank hung until torchrun's SIGKILL, its message unprinted. A barrier
            # waits, with the GIL released, until the worker is done with the broadcast.
            dist.barrier()
    if problem is not None:
        raise UserError(problem)


def train(
    cfg: TrainConfig,
    *,
    resume: Path | None = None,
    explicit: set[str] | None = None,
    hooks: TrainHooks | None = None,
    restart_best: bool = False,
) -> RunResult:
    """Run (or resume) a training run; rank 0 writes checkpoints and reports into out_dir.

    `explicit` names the settings the user passed on the command line; with `resume` only
    those of training.resume.RESUME_OVERRIDABLE may differ from the checkpoint's.
    `restart_best` resumes a run whose best.pt is lost: the best is then tracked again from
    the resumed epoch on.
    """
    hooks = hooks or TrainHooks()
    if resume is not None and resume.is_symlink():
        # A link to a run's last.pt (runs/latest.pt, say) stands for that run: its folder holds
        # best.pt and the lock, and the next last.pt must replace the file, not the link.
        resume = resume.resolve()
    dist_info, device = init_distributed(cfg.device)
    try:
        with ExitStack() as held:  # the run folder's lock, once taken
            return _train(
                cfg, resume, explicit or set(), hooks, dist_info, device, held, restart_best
            )
    finally:
        shutdown_distributed()


def _wants_warmup(device: torch.device) -> bool:
    """GPUs have one-time costs worth overlapping with the decoding (see training.warmup)."""
    return device.type == "cuda"


def _optimizer_and_schedule(
    model: torch.nn.Module,
    cfg: TrainConfig,
    ckpt: dict[str, Any] | None,
    steps_per_epoch: int,
    graphs: bool,
    device: torch.device,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR | None]:
    """SGD and the one-cycle schedule (None for a constant rate), at a resumed run's state."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    for group in optimizer.param_groups:
        _set_lr(group, float(group["lr"]), graphs, device)
    scheduler = None
    if cfg.schedule == "onecycle":
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.warmup * total_steps <= 1:  # at exactly 1, OneCycleLR divides by zero
            raise UserError(
                f"--schedule onecycle needs a warm-up of more than 1 step, but --warmup "
                f"{cfg.warmup} of {total_steps} steps is {cfg.warmup * total_steps:g}; train "
                "longer (more --epochs or images, a smaller --batch-size) or raise --warmup"
            )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=cfg.warmup,
            cycle_momentum=False,  # momentum is baked into a CUDA graph as a constant
        )
        if ckpt is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
            for group, value in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                _set_lr(group, float(value), graphs, device)
    return optimizer, scheduler


def _train_epoch(
    step: TrainStep,
    scheduler: torch.optim.lr_scheduler.OneCycleLR | None,
    epoch: int,
    cfg: TrainConfig,
    dist_info: Distributed,
    hooks: TrainHooks,
    *,
    show_bar: bool,
) -> tuple[float, float]:
    """One epoch (0-based) of steps in that epoch's own order: (sum of the batches' mean
    losses, correct predictions), over all processes."""
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, dist_info.rank))
    order = epoch_order(len(step.train), epoch, cfg.seed, step.device)
    batches = batch_slices(order, cfg.batch_size, dist_info.rank, dist_info.world_size)
    step.reset_stats()
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not show_bar, unit="step")  # fmt: skip
    last_epoch = epoch + 1 == cfg.epochs
    for i, index in enumerate(batches):
        step(index)
        # Not past the final step: OneCycleLR has no value there (and would say so).
        if scheduler is not None and not (last_epoch and i + 1 == len(batches)):
            scheduler.step()
        bar.update()
        if hooks.on_step:
            hooks.on_step(epoch + 1, i + 1)
    bar.close()
    stats = torch.stack([step.loss_sum, step.correct.float()])
    if dist_info.enabled:
        dist.all_reduce(stats)
    loss_sum, correct = stats.tolist()  # waits for the epoch's last step
    if not math.isfinite(loss_sum):  # every rank sees the same sum: all stop here
        raise Diverged(
            f"the training loss became {loss_sum} in epoch {epoch + 1}: the run diverged at "
            f"learning rate {step.optimizer.param_groups[0]['lr']:g}; start again with a "
            "lower --lr (this epoch's weights were not saved)"
        )
    return loss_sum, correct


def _train(
    cfg: TrainConfig,
    resume: Path | None,
    explicit: set[str],
    hooks: TrainHooks,
    dist_info: Distributed,
    device: torch.device,
    held: ExitStack,
    restart_best: bool = False,
) -> RunResult:
    """train()'s body, in order: refuse a run folder in use; read a resume's checkpoint
    (training.resume); settle precision and CUDA graphs; check the output folder; decode the
    data (warming the GPU up meanwhile); build the model, optimizer, schedule and step; take
    the folder's lock; train the epochs, queueing best.pt and last.pt after each; and
    `_finish`: the test set, the final checkpoints, the reports."""
    ckpt: dict[str, Any] | None = None
    resumed_file = None
    # A folder in use is refused first: before the data is decoded (minutes for a large set)
    # and, for a resume, before the run's files are read (between two writes a running run's
    # best.pt is an epoch ahead of last.pt, which was reported as a fault). The lock itself is
    # taken below, once the folder is settled.
    busy = resume.parent if resume is not None else cfg.out_dir
    problem: str | None = None
    if busy is not None and busy.is_dir() and dist_info.is_main:
        try:
            with run_lock(busy, resuming=resume is not None):
                pass
        except UserError as exc:
            problem = str(exc)
    _stop_on_rank_0s_verdict(problem, dist_info)
    if resume is not None:
        resumed_file = _file_identity(resume)  # before reading it: see the lock below
        # Its warnings once per job, not once per process.
        ckpt, cfg, restart_best = load_resume(
            resume, cfg, explicit, restart_best, main=dist_info.is_main
        )
    # Absolute in the checkpoints: the resume command that a stopped run prints (an absolute
    # --resume path) works from any folder; a relative --data-dir used to be looked up again
    # in whatever folder the resume ran from, and refused as "not a directory".
    cfg = replace(
        cfg,
        data_dir=cfg.data_dir.absolute() if cfg.data_dir is not None else None,
        download_root=cfg.download_root.absolute(),
    )
    if cfg.early_sgd and dist_info.enabled:
        # Its updates would start before DDP has averaged the gradients over the processes.
        raise UserError("--early-sgd is for one process; drop it under torchrun")
    if cfg.batch_size % dist_info.world_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} must split evenly over {dist_info.world_size} processes"
        )
    precision = _precision(cfg, device)
    graphs = _use_graphs(cfg, device, dist_info)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # fixed shapes: tune each once

    _check_out_dir_before_decoding(cfg, resume, dist_info)

    t_load = time.perf_counter()
    prep = Preprocessing()
    warmup_s: float | None = None

    def warm() -> None:
        nonlocal warmup_s
        t_warm = time.perf_counter()
        try:
            warm_up(
                device,
                batch_size=cfg.batch_size // dist_info.world_size,
                eval_batch_size=cfg.eval_batch_size,
                precision=precision,
                model_config=AlexNetConfig(dropout=cfg.dropout),  # the class count: known later
                augment=cfg.augment,
                crop_padding=cfg.crop_padding,
                prep=prep,
            )
        except Exception as exc:  # only a head start: the run itself reports what is wrong
            log.warning("GPU warm-up failed, training without it: %s", str(exc).split("\n")[0])
            return
        warmup_s = time.perf_counter() - t_warm

    data = load_data(
        cfg.data_dir,
        cfg.download_root,
        valid_size=cfg.valid_size,
        split_seed=cfg.split_seed,
        source_size=prep.source_size,
        while_decoding=warm if cfg.gpu_warmup and _wants_warmup(device) else None,
    )
    if ckpt is not None:
        _check_same_data(data, ckpt, resume)
    if len(data.train) < cfg.batch_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training images"
        )
    data = Data(
        data.train.to(device),
        data.valid.to(device),
        data.test.to(device),
        data.classes,
        data.source,
    )
    load_s = time.perf_counter() - t_load
    log.info(
        "data: %d train / %d validation / %d test images, %d classes, from %s (%.1fs%s)",
        len(data.train), len(data.valid), len(data.test), len(data.classes), data.source,
        load_s,
        "" if warmup_s is None else f"; {device.type.upper()} warm-up {warmup_s:.1f}s of it",
    )  # fmt: skip

    torch.manual_seed(cfg.seed)
    model_cfg = AlexNetConfig(num_classes=len(data.classes), dropout=cfg.dropout)
    model = AlexNet(model_cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"]["state_dict"])
    model = model.to(device, memory_format=torch.channels_last if precision.channels_last else None)
    use_space_to_depth(model, device.type == "cuda")

    steps_per_epoch = len(data.train) // cfg.batch_size
    optimizer, scheduler = _optimizer_and_schedule(
        model, cfg, ckpt, steps_per_epoch, graphs, device
    )

    trained: torch.nn.Module = model
    if dist_info.enabled:
        trained = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    transform = InputTransform(prep).to(device)
    step = TrainStep(
        trained,
        transform,
        optimizer,
        data.train,
        local_batch_size=cfg.batch_size // dist_info.world_size,
        label_smoothing=cfg.label_smoothing,
        augment=cfg.augment,
        crop_padding=cfg.crop_padding,
        precision=precision,
        early_sgd=model.head_parameters() if cfg.early_sgd else None,
    )
    held.callback(step.close)  # however the run ends, the model keeps no training hooks

    out_dir = _choose_out_dir(cfg, resume, dist_info)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if dist_info.is_main:
        try:
            _check_writable(out_dir)  # now, not after the first epoch has trained
            held.enter_context(run_lock(out_dir, resuming=resume is not None))
            if resume is not None and _file_identity(resume) != resumed_file:
                # Another process resumed this run after we read last.pt and before we took
                # the lock (our decoding outlasted its run): training on from what we read
                # would overwrite its newer epochs.
                raise UserError(
                    f"{resume} was rewritten by another training process while this one "
                    "started; run the same command again to continue from its new state"
                )
        except UserError as exc:
            problem = str(exc)
    _stop_on_rank_0s_verdict(problem, dist_info)
    if dist_info.is_main:
        # A killed process's half-written checkpoints: safe to remove, as no other process
        # writes here while we hold the lock.
        for stale in half_written(out_dir):
            stale.unlink(missing_ok=True)
        cfg = replace(cfg, out_dir=out_dir)
    metrics: list[dict[str, Any]] = list(ckpt["metrics"]) if ckpt else []
    best: dict[str, Any] = dict(ckpt["best"]) if ckpt else {"epoch": 0, "val_acc": -1.0}
    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    elapsed_before = metrics[-1]["elapsed_s"] if metrics else 0.0
    if ckpt and dist_info.is_main:
        # The file may be an epoch behind last.pt (a kill between the two writes); a resume of
        # a run whose epochs are all done writes it nowhere else.
        report.write_metrics(out_dir / "metrics.jsonl", metrics)
    data_info = {
        "source": data.source,
        "train": len(data.train),
        "valid": len(data.valid),
        "test": len(data.test),
    }

    def checkpoint(
        epoch: int, state: dict[str, Any], with_optimizer: bool, test: dict | None
    ) -> dict:
        ckpt_out: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "training",
            "model": model_section(state, model_cfg),
            "classes": list(data.classes),
            "preprocessing": prep.to_dict(),
            "recipe": cfg.recipe,
            "config": cfg.to_dict(),
            "epoch": epoch,
            "step": epoch * steps_per_epoch,
            "metrics": [dict(m) for m in metrics],
            "best": dict(best),
            "test": test,
            "data": data_info,
            "versions": library_versions(),
            "world_size": dist_info.world_size,
        }
        if with_optimizer:
            ckpt_out["optimizer"] = to_cpu(optimizer.state_dict(), non_blocking=True)
            ckpt_out["scheduler"] = (
                to_cpu(scheduler.state_dict(), non_blocking=True) if scheduler else None
            )
        return ckpt_out

    def copies_done() -> torch.cuda.Event | None:
        """An event the writer waits on before reading non-blocking snapshots."""
        if device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    writer = CheckpointWriter() if dist_info.is_main else None
    best_state: dict[str, torch.Tensor] | None = None
    if restart_best and writer is not None:
        best_state = to_cpu(model.state_dict())  # the resumed weights: last.pt's
        writer.submit(checkpoint(start_epoch, best_state, False, None), best_path)
    show_bar = dist_info.is_main and sys.stderr.isatty()
    log.info(
        "training %s on %s x%d: %s of %s, batch %d, %s%s%s",
        cfg.recipe, device, dist_info.world_size, _count(cfg.epochs, "epoch"),
        _count(steps_per_epoch, "step"), cfg.batch_size,
        "bf16 autocast" if precision.amp_dtype else "fp32",
        ", channels_last" if precision.channels_last else "",
        ", CUDA graph" if graphs else "",
    )  # fmt: skip

    final_queued = False  # the final last.pt (with the test result) is in the writer's hands

    def stopped(exc: BaseException) -> None:
        """On any exception: what is queued reaches the disk, and the user learns how to go on."""
        if writer is not None:
            with _deaf_to_stops():
                writer.close()
            if final_queued:  # a resume would only answer "already finished"
                log.warning("stopped as the run ended; its files in %s are complete", out_dir)
            elif last_path.exists() and not isinstance(exc, Diverged):  # it would diverge again
                # Absolute: the command works from any folder (runs/... was relative to this one).
                log.warning(
                    "stopped; continue with: python -m training.run --resume %s",
                    shlex.quote(str(last_path.absolute())),  # a command to paste, spaces and all
                )
            elif isinstance(exc, KeyboardInterrupt):
                log.warning("stopped before the first epoch ended: nothing to resume")

    t_start = time.perf_counter()
    try:
        if graphs:
            try:
                step.capture_graph(model)
            except RuntimeError as exc:
                if not cfg.early_sgd:
                    raise
                # Its side stream is the one part of a step that a GPU may refuse to capture.
                raise UserError(
                    f"--early-sgd could not be captured in a CUDA graph here "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); drop "
                    "--early-sgd, or keep it with --no-cuda-graphs"
                ) from exc
            log.info(
                "captured the training step as a CUDA graph (%.1fs)", time.perf_counter() - t_start
            )
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            loss_sum, correct = _train_epoch(
                step, scheduler, epoch, cfg, dist_info, hooks, show_bar=show_bar
            )
            train_s = time.perf_counter() - t_epoch
            t_val = time.perf_counter()
            val = evaluate(model, transform, data.valid, data.classes,
                           batch_size=cfg.eval_batch_size, precision=precision)  # fmt: skip
            val_s = time.perf_counter() - t_val
            seen = step.steps * cfg.batch_size
            m = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / (step.steps * dist_info.world_size),
                "train_acc": correct / seen * 100,
                "val_acc": val["accuracy"],
                "lr": float(optimizer.param_groups[0]["lr"]),
                "images_per_s": seen / train_s,
                "train_s": train_s,
                "val_s": val_s,
            }
            if dist_info.is_main and writer is not None:
                with _stops_deferred():  # best.pt and last.pt queued together
                    state = to_cpu(model.state_dict(), non_blocking=True)
                    is_best = m["val_acc"] > best["val_acc"]
                    if is_best:
                        best = {**best, "epoch": epoch + 1, "val_acc": m["val_acc"]}
                        best_state = state
                    m["epoch_s"] = time.perf_counter() - t_epoch
                    m["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                    metrics.append(m)
                    ready = copies_done()
                    # best.pt first: last.pt records the best epoch, so a run stopped between
                    # the two writes never resumes with a record that best.pt does not hold yet.
                    if is_best:
                        writer.submit(checkpoint(epoch + 1, state, False, None), best_path, ready)
                    # metrics.jsonl follows last.pt onto the disk, never ahead of it: a run
                    # stopped between the two shows no epoch that a resume would train again.
                    write_lines = partial(
                        report.write_metrics, out_dir / "metrics.jsonl", list(metrics)
                    )
                    writer.submit(
                        checkpoint(epoch + 1, state, True, None), last_path, ready, write_lines
                    )
                    log.info(report.epoch_line(m, cfg.epochs))
            else:
                m["epoch_s"] = time.perf_counter() - t_epoch
                m["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                metrics.append(m)
            if hooks.on_epoch_end:
                hooks.on_epoch_end(epoch + 1, m)
        train_seconds = time.perf_counter() - t_start
    except BaseException as exc:
        stopped(exc)
        raise

    if not dist_info.is_main or writer is None:
        return RunResult(out_dir, last_path, best_path, metrics, {}, {}, train_seconds)

    def _finish() -> RunResult:
        """After the last epoch: the test set, the final checkpoints, the reports."""
        nonlocal best_state, final_queued
        # The notebook reports the final weights on the test set; we also test the best-validation ones.
        final_state = to_cpu(model.state_dict())  # blocking: the model changes below
        test = evaluate(model, transform, data.test, data.classes,
                        batch_size=cfg.eval_batch_size, precision=precision)  # fmt: skip
        if best_state is None:  # resumed after the best epoch: it is on disk
            best_state = load_checkpoint(best_path)["model"]["state_dict"]
        model.load_state_dict(best_state)
        best_test = evaluate(model, transform, data.test, data.classes,
                             batch_size=cfg.eval_batch_size, precision=precision)  # fmt: skip
        final_ckpt = checkpoint(cfg.epochs, final_state, True, test)
        final_ready = copies_done()
        writer.submit(checkpoint(best["epoch"], best_state, False, best_test), best_path)
        log.info(
            "test accuracy %.2f%% (final weights), %.2f%% (best validation, epoch %d); "
            "%s in %.1fs incl. validation",
            test["accuracy"], best_test["accuracy"], best["epoch"],
            _count(cfg.epochs - start_epoch, "epoch"), train_seconds,
        )  # fmt: skip
        title = f"AlexNet, recipe {cfg.recipe}"
        drawn = _draw_figures({
            "curves.png": lambda path: report.plot_curves(path, metrics, title),
            "confusion.png": lambda path: report.plot_confusion(
                path, test["confusion"], data.classes, f"{title}: test {test['accuracy']:.2f}%"
            ),
        }, out_dir)  # fmt: skip
        summary = {
            "recipe": cfg.recipe,
            "config": cfg.to_dict(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "world_size": dist_info.world_size,
            "epochs": cfg.epochs,
            "resumed_from_epoch": start_epoch,
            "train_seconds": train_seconds,
            # Before the training clock starts: decoding and moving the data to the device,
            # and the GPU warm-up that ran during it (None: no warm-up).
            "load_seconds": load_s,
            "warmup_seconds": warmup_s,
            "test": test,
            "best": {**best, "test": best_test},
            "data": data_info,
            "versions": library_versions(),
        }
        report.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        # last.pt with its test result goes last: until it is on disk, a resume runs the final
        # evaluation again and writes everything above anew.
        writer.submit(final_ckpt, last_path, final_ready)
        final_queued = True
        writer.close()
        log.info(
            "wrote %s, %s, metrics.jsonl, summary.json%s",
            last_path, best_path, "".join(f", {name}" for name in drawn),
        )  # fmt: skip
        return RunResult(out_dir, last_path, best_path, metrics, test, best_test, train_seconds)

    try:
        return _finish()
    except BaseException as exc:  # Ctrl-C or an error during the test evaluation or the reports
        stopped(exc)
        raise
