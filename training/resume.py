"""What a resumed run continues from: its last.pt, the run's own settings, and its best.pt.

A run folder holds last.pt (every epoch, with the optimizer) and best.pt (the best-validation
weights), written one after the other. A run stopped between the two writes, or one whose
best.pt was lost or damaged, is reconciled here before training goes on, or refused with a
message that says how to go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError, load_checkpoint
from training.errors import UserError
from training.recipes import TrainConfig

log = logging.getLogger(__name__)

# Settings a resumed run may change: where things are and how the run goes about its work,
# not the weights it computes (--early-sgd and the warm-up keep them bit for bit).
RESUME_OVERRIDABLE = {
    "device", "data_dir", "download_root", "eval_batch_size", "gpu_warmup", "early_sgd",
}  # fmt: skip


def resume_config(ckpt: dict[str, Any], cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The run's own settings, with those of `explicit` (the flags the user passed) that a
    resume may change; any other flag that differs is refused."""
    saved = TrainConfig.from_dict(ckpt["config"])
    changed = sorted(
        k for k in explicit - RESUME_OVERRIDABLE - {"out_dir"}
        if getattr(cfg, k) != getattr(saved, k)
    )  # fmt: skip
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserError(f"{flags} cannot change when resuming; the run continues with its own")
    return replace(saved, **{k: getattr(cfg, k) for k in explicit & RESUME_OVERRIDABLE})


def load_resume(
    resume: Path, cfg: TrainConfig, explicit: set[str], restart_best: bool, *, main: bool = True
) -> tuple[dict[str, Any], TrainConfig, bool]:
    """(last.pt's contents, the run's settings, whether best.pt is to be written anew from
    last.pt's weights before training goes on). Its warnings are logged at info level where
    `main` is false: under torchrun, once per job."""
    warn = log.warning if main else log.info
    ckpt = load_checkpoint(resume)
    if "optimizer" not in ckpt:
        raise CheckpointError(
            f"{resume} holds weights only (a best.pt or an export); resume from last.pt"
        )
    if "out_dir" in explicit and Path(cfg.out_dir or ".").resolve() != resume.parent.resolve():
        raise UserError(
            f"a resumed run continues in its own folder, {resume.parent}; drop --out-dir"
        )
    cfg = resume_config(ckpt, cfg, explicit).validate()
    saved_data = cfg.data_dir
    if "data_dir" not in explicit and saved_data is not None and not saved_data.is_dir():
        if not saved_data.is_absolute():
            raise UserError(
                f"the run's --data-dir {saved_data} was relative to the folder it started "
                f"in and is not in {Path.cwd()}; resume from there, or pass --data-dir DIR"
            )
        # The user passed no --data-dir: "--data-dir ... is not a directory" left them to
        # guess that the flag may be given again on a resume.
        raise UserError(
            f"the run's data folder {saved_data} (recorded in {resume.name}) is gone; "
            "resume with --data-dir DIR, where that data is now"
        )
    if ckpt["epoch"] >= cfg.epochs and ckpt.get("test") is not None:
        raise UserError(f"{resume} already finished all {cfg.epochs} epochs; nothing to resume")
    # (All epochs done but no test result: stopped during the final evaluation; resuming
    # runs just that.)
    restart_best = _reconcile_best(ckpt, resume, cfg, restart_best, warn)
    return ckpt, cfg, restart_best


def _reconcile_best(
    ckpt: dict[str, Any],
    resume: Path,
    cfg: TrainConfig,
    restart_best: bool,
    warn: Callable[..., None],
) -> bool:
    """Check best.pt against last.pt's record of the best epoch (fixing `ckpt["best"]` where
    best.pt is the one to follow); true if best.pt is to be rebuilt from last.pt's weights."""
    best_epoch = int(ckpt["best"]["epoch"])
    best_file = resume.parent / "best.pt"
    # The way on when best.pt is lost, from every refusal below.
    way_on = (
        f"or resume with --restart-best: best.pt then holds the best of epochs "
        f"{ckpt['epoch']}-{cfg.epochs}"
    )
    on_disk: dict[str, Any] | None = None
    lost = "missing" if best_epoch > 0 and not best_file.exists() else None
    if best_file.exists():
        try:
            on_disk = dict(load_checkpoint(best_file)["best"])
        except CheckpointError as exc:
            lost = str(exc)
    behind = on_disk is not None and int(on_disk["epoch"]) < best_epoch == ckpt["epoch"]
    if restart_best and lost is None and not behind:  # it would replace good weights
        raise UserError(f"{best_file} is fine; resume without --restart-best")
    if behind:
        # Versions before 2026-11-27 wrote last.pt first: a run stopped between the two
        # writes left best.pt an epoch behind a best epoch that is last.pt's own. The best
        # weights are last.pt's: best.pt is rebuilt from them, the record kept.
        warn(
            "best.pt holds epoch %d, behind the best epoch %d that %s records and holds: "
            "rebuilding it from %s",
            on_disk["epoch"], best_epoch, resume.name, resume.name,
        )  # fmt: skip
        return True
    if lost is not None and best_epoch == ckpt["epoch"]:
        # The best epoch is last.pt's own: its weights are best.pt's, and nothing is lost.
        # best.pt is rebuilt from them (as --restart-best does), the record kept.
        warn(
            "%s; it held the weights of epoch %d, which %s holds too: rebuilding it from them",
            f"{best_file} is missing" if lost == "missing" else lost.rstrip("."),
            best_epoch, resume.name,
        )  # fmt: skip
        return True
    if restart_best:
        # last.pt's own weights are the best known from here on: best.pt is rewritten from
        # them, so a stop before the next epoch still leaves a run that resumes.
        warn(
            "--restart-best: the best-validation weights of epoch %d are lost; best.pt will "
            "hold the best of epochs %d-%d", best_epoch, ckpt["epoch"], cfg.epochs,
        )  # fmt: skip
        last_val = ckpt["metrics"][-1]["val_acc"] if ckpt["metrics"] else -1.0
        # since_epoch: the record says that earlier epochs were not in the running.
        ckpt["best"] = {"epoch": ckpt["epoch"], "val_acc": last_val, "since_epoch": ckpt["epoch"]}
        return True
    if lost == "missing":
        raise UserError(
            f"{best_file} is missing: the run's best-validation weights (epoch "
            f"{best_epoch}) are kept there; put it back beside {resume.name}, {way_on}"
        )
    if lost is not None:
        raise UserError(
            f"{lost.rstrip('.')}; it holds the run's best-validation weights (epoch "
            f"{best_epoch}): replace it with a good copy, {way_on}"
        )
    if on_disk is not None and int(on_disk["epoch"]) != best_epoch:
        # best.pt is written before last.pt, so a run stopped between the two writes has a
        # best.pt one epoch ahead of last.pt's record (or, written by versions before
        # 2026-11-27, behind a best epoch before last.pt's, whose weights are gone). The
        # record follows what the file holds.
        warn(
            "best.pt holds epoch %d, last.pt records epoch %d as the best: keeping best.pt's",
            on_disk["epoch"], best_epoch,
        )  # fmt: skip
        ckpt["best"] = on_disk
    return False
