"""python -m training.evaluate MODEL: offline accuracy of a checkpoint or an exported artifact.

    python -m training.evaluate weights/ --data-dir DIR                  # the shipped model
    python -m training.evaluate runs/fast-.../last.pt --data-dir DIR --predictions-out p.json

It runs the model exactly as the app does (same preprocessing module, same precision modes), so
its per-image predictions can be compared with what the server answers (`app.client evaluate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.cli_args import path_arg
from training.errors import UserError, check_output_file
from training.interrupts import exit_status, stop_status, stops_held

# training.engine.INFERENCE_PRECISIONS, spelled out: importing it would load PyTorch before a
# Ctrl-C can be held (a test checks that the two agree).
PRECISIONS = ("fp32", "bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "model", type=path_arg, help="a last.pt/best.pt checkpoint or an exported folder"
    )
    parser.add_argument(
        "--data-dir",
        type=path_arg,
        help="image-folder tree with test/<class>/* (else: CIFAR-10 download)",
    )
    parser.add_argument("--download-root", type=path_arg, default=Path("data"),
                        help="where the CIFAR-10 download is (default: data)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default) or bf16 weights, as the app serves them")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=500, help="default: 500")
    parser.add_argument(
        "--predictions-out", type=path_arg, help="write {image name: class id} as JSON"
    )
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with stops_held() as stops:
        from training.artifact import load_for_inference
        from training.data import load_test_split
        from training.engine import evaluate_model
        from training.report import per_class_lines, write_text_atomic
        from training.runtime import resolve_device
    if stops:
        return stop_status(stops[0])
    try:
        if args.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if args.predictions_out is not None:
            # Checked now: the evaluation may take minutes, and its report must not be lost.
            check_output_file("--predictions-out", args.predictions_out)
            _refuse_writing_over_the_model(args.predictions_out, args.model)
        device = resolve_device(args.device)  # first: a missing GPU, before minutes of decoding
        loaded = load_for_inference(args.model)
        split, classes, names = load_test_split(args.data_dir, args.download_root)
        report, predictions = evaluate_model(
            loaded,
            split,
            classes,
            device=device,
            precision=args.precision,
            batch_size=args.batch_size,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        return 130
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.model}: {report['accuracy']:.2f}% top-1 on {report['images']} images "
              f"({args.precision}, {device}, {report['images_per_s']:.0f} img/s)")  # fmt: skip
        for line in per_class_lines(report["per_class"]):
            print(line)
    if args.predictions_out:
        try:
            write_text_atomic(
                args.predictions_out,
                json.dumps(dict(zip(names, predictions.tolist(), strict=True))),
            )
        except OSError as exc:
            print(f"error: cannot write {args.predictions_out}: {exc.strerror}", file=sys.stderr)
            return 2
    return 0


def _refuse_writing_over_the_model(out: Path, model: Path) -> None:
    """`--predictions-out` naming the model (a tab-completed path, say) would replace it with
    a JSON file once the evaluation is done; an artifact folder's model.json the same."""
    from training.artifact import INDEX_NAME  # loaded already, with load_for_inference

    target, model = out.resolve(), model.resolve()
    if model.name == INDEX_NAME:  # an artifact named by its index: the folder is the model
        model = model.parent
    if target == model or (model.is_dir() and target.parent == model):
        where = "is the model" if target == model else "is inside the model folder"
        raise UserError(f"--predictions-out {out} {where} being evaluated; choose another path")


if __name__ == "__main__":
    sys.exit(exit_status(main))
