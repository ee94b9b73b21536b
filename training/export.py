"""python -m training.export CHECKPOINT --out weights/: write the serving artifact.

No optimizer state, no pickle: int8 per-output-channel weights in safetensors shards of at most
15 MiB with a model.json index (checksums, classes, preprocessing, accuracy, recipe). With
test data (--data-dir, or --download-root for the CIFAR-10 download) it measures the artifact's
test accuracy next to the full-precision checkpoint's and records both in model.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from training.cli_args import path_arg
from training.errors import UserError
from training.interrupts import exit_status, stop_status, stops_held

if TYPE_CHECKING:  # main imports them, once a Ctrl-C can be held
    import torch

    from training.artifact import ExportResult, InferenceModel
    from training.data import Split

TOTAL_LIMIT_BYTES = 64_000_000  # what a git repository should carry for the model
MAX_DROP = 0.2  # points of test accuracy the int8 export may lose against the checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=path_arg, help="a last.pt or best.pt from training.run")
    # Required: a default of weights/ replaced the shipped model whenever --out was forgotten.
    parser.add_argument("--out", type=path_arg, required=True,
                        help="artifact folder, e.g. weights/ (the served model is replaced)")  # fmt: skip
    parser.add_argument(
        "--data-dir", type=path_arg, help="measure test accuracy on DIR/test/<class>/*"
    )
    parser.add_argument("--download-root", type=path_arg, default=None,
                        help="measure test accuracy on the CIFAR-10 download in this folder")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--max-drop", type=float, default=None,
                        help="with test data: fail if the artifact's test accuracy is more than this "
                        f"many points below the checkpoint's (default {MAX_DROP})")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with stops_held() as stops:
        from training.artifact import checkpoint_for_inference, staged_artifact
        from training.checkpoint import load_checkpoint_and_digest
        from training.data import load_test_split
        from training.engine import check_classes
        from training.runtime import resolve_device
    if stops:
        return stop_status(stops[0])
    try:
        if args.max_drop is not None and not args.max_drop >= 0:  # NaN would refuse nothing
            raise UserError(f"--max-drop must be 0 or more points, not {args.max_drop}")
        # First, like every other command: a missing GPU was found only after the shards
        # were written (with test data), or not at all (without).
        device = resolve_device(args.device)
        ckpt, checksum = load_checkpoint_and_digest(args.checkpoint)
        full = checkpoint_for_inference(ckpt, checksum, args.checkpoint)  # what it would serve
        test = None
        if args.data_dir is not None or args.download_root is not None:
            # Before anything is written: test data that cannot be read, or whose classes are
            # not the model's, failed only after 58 MB of shards were staged.
            split, classes, _ = load_test_split(args.data_dir, args.download_root or Path("data"))
            check_classes(classes, full.classes)
            test = (split, classes)
        # Checked before it replaces --out: a rejected export leaves the served model as it was.
        with staged_artifact(ckpt, args.out) as staged:
            _check(staged, full, args, test, device)
        print(f"installed in {args.out}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback (an export leaves --out as it was)
        return 130
    return 0


def _check_total(total_bytes: int, out: Path, what: str = "") -> None:
    if total_bytes > TOTAL_LIMIT_BYTES:
        raise UserError(
            f"the artifact is {total_bytes:,} bytes{what}, over {TOTAL_LIMIT_BYTES:,}; "
            f"{out} left as it was"
        )


def _check(
    staged: ExportResult,
    full: InferenceModel,
    args: argparse.Namespace,
    test: tuple[Split, list[str]] | None,
    device: torch.device,
) -> None:
    """Size limits, that the artifact loads as the app will load it, and, with test data, the
    accuracy drop against the checkpoint (recorded in the staged model.json); UserError when
    the artifact fails them."""
    # Loaded by main already (training.report is plain Python): these only bind the names.
    from training.artifact import INDEX_NAME, MAX_SHARD_BYTES, load_for_inference, writing_to
    from training.engine import evaluate_model
    from training.report import write_text_atomic

    largest = max(f["bytes"] for f in staged.files.values())
    print(f"wrote {len(staged.files)} shards + {INDEX_NAME}: "
          f"{staged.total_bytes:,} bytes, largest file {largest:,} bytes "
          f"(limits: {TOTAL_LIMIT_BYTES:,} in all, {MAX_SHARD_BYTES:,} per file)")  # fmt: skip
    _check_total(staged.total_bytes, args.out)
    quantized = load_for_inference(staged.out_dir)
    if test is None:
        if args.max_drop is not None:
            print("note: --max-drop needs test data (--data-dir or --download-root); the "
                  "artifact's accuracy was not measured", file=sys.stderr)  # fmt: skip
        return
    split, classes = test
    full_report, full_pred = evaluate_model(full, split, classes, device=device)
    quant_report, quant_pred = evaluate_model(quantized, split, classes, device=device)
    # From the counts, in one division: the difference of the two percentages is off in its
    # last bit (100.0 - 99.8 > 0.2), and a drop of exactly --max-drop was refused.
    labels = split.labels.cpu()
    lost = int((full_pred == labels).sum()) - int((quant_pred == labels).sum())
    drop = lost * 100 / len(split)
    index_path = staged.out_dir / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["export"] = {
        "test": {k: quant_report[k] for k in ("accuracy", "images", "per_class", "confusion")},
        "full_precision_test_accuracy": full_report["accuracy"],
        "accuracy_drop_points": drop,
        "top1_disagreements": int((full_pred != quant_pred).sum()),
        "evaluated_with": f"fp32 on {device}",
        "data": args.data_dir.as_posix() if args.data_dir else "torchvision CIFAR-10",
    }
    with writing_to(args.out):  # a full disk: one line, and --out left as it was
        write_text_atomic(index_path, json.dumps(index, indent=1) + "\n")
    print(f"test accuracy: checkpoint {full_report['accuracy']:.2f}%, "
          f"artifact {quant_report['accuracy']:.2f}% ({drop:+.2f} points drop), "
          f"{index['export']['top1_disagreements']} of {len(split)} top-1 predictions differ")  # fmt: skip
    # Again with the test report in model.json (a confusion matrix grows with the classes
    # squared): the limit is on what is installed.
    _check_total(
        sum(f["bytes"] for f in staged.files.values()) + index_path.stat().st_size,
        args.out,
        f" with the test report in {INDEX_NAME}",
    )
    max_drop = MAX_DROP if args.max_drop is None else args.max_drop
    if drop > max_drop:
        raise UserError(
            f"the artifact loses {drop:.2f} points of test accuracy (> --max-drop "
            f"{max_drop}); {args.out} left as it was"
        )


if __name__ == "__main__":
    sys.exit(exit_status(main))
