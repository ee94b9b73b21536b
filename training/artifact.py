"""The serving artifact (`weights/`): int8 weights in checksummed safetensors shards, and loading
either it or a full training checkpoint for inference.

Layout of an artifact folder:
    model.json                          index + everything the app needs (classes, preprocessing,
                                        accuracy, recipe), and the sha256 of every shard
    model-00001-of-0000N.safetensors    tensors, each shard at most 15 MiB (fits a git host)

Conv and linear weights are quantized per output channel, symmetric int8 (weight-only): the
model is dequantized to float32 at load, so inference code is the same for both formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.checkpoint import (
    CheckpointError,
    build_model,
    check_header,
    load_checkpoint,
    preprocessing_of,
)
from training.errors import UserError
from training.model import ARCHITECTURE, AlexNet, AlexNetConfig
from training.preprocess import Preprocessing

ARTIFACT_FORMAT = "alexnet-serve/artifact"
ARTIFACT_VERSION = 1
INDEX_NAME = "model.json"
MAX_SHARD_BYTES = 15 * 1024 * 1024
QUANTIZATION = "int8 weight-only, symmetric, per output channel (conv and linear weights)"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales (one per output channel) with weight ~= q * scale."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.view(-1, *([1] * (q.dim() - 1)))


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() in (2, 4)


def quantized_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict the artifact will load as (for measuring the export's accuracy)."""
    out = {}
    for name, tensor in state.items():
        out[name] = (
            dequantize(*quantize_per_channel(tensor)) if _is_quantized(name, tensor) else tensor
        )
    return out


def _pack(
    tensors: dict[str, torch.Tensor], max_bytes: int
) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """Greedy packing into shards; a tensor larger than the room left is split along dim 0."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    room = max_bytes
    layout: dict[str, list[dict[str, Any]]] = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        row_bytes = (
            tensor[0].numel() * tensor.element_size() if tensor.dim() else tensor.element_size()
        )
        rows = tensor.shape[0] if tensor.dim() else 1
        start = 0
        layout[name] = []
        while start < rows:
            fit = room // row_bytes if tensor.dim() else (1 if room >= row_bytes else 0)
            if fit == 0:
                shards.append({})
                room = max_bytes
                continue
            end = min(rows, start + fit)
            key = name if (start, end) == (0, rows) else f"{name}@{start}:{end}"
            part = tensor[start:end] if tensor.dim() else tensor
            shards[-1][key] = part.clone()
            layout[name].append({"shard": len(shards) - 1, "key": key, "rows": [start, end]})
            room -= (end - start) * row_bytes
            start = end
    return shards, layout


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, dict[str, Any]]
    total_bytes: int


def export_artifact(
    ckpt: dict[str, Any],
    out_dir: Path,
    *,
    extra: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> ExportResult:
    """Write the artifact for a training checkpoint into `out_dir` (replacing an older one).

    Written into a temporary folder beside `out_dir`, then swapped in, so a failed export never
    leaves a half-written artifact behind.
    """
    with staged_artifact(ckpt, out_dir, extra=extra, max_shard_bytes=max_shard_bytes) as staged:
        files, total = staged.files, staged.total_bytes
    return ExportResult(Path(out_dir), files, total)


@contextmanager
def staged_artifact(
    ckpt: dict[str, Any],
    out_dir: Path,
    *,
    extra: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Iterator[ExportResult]:
    """Write the artifact into a temporary folder beside `out_dir` and yield it (its `out_dir`
    is that folder) for checks. It replaces the artifact in `out_dir` when the block ends
    normally; if the block raises, `out_dir` is left as it was."""
    state = ckpt["model"]["state_dict"]
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, tensor in state.items():
        if _is_quantized(name, tensor):
            q, scale = quantize_per_channel(tensor)
            tensors[name + ".int8"] = q
            tensors[name + ".scale"] = scale
            entries[name] = {"dtype": "int8", "shape": list(tensor.shape)}
        else:
            tensors[name] = tensor.detach().cpu()
            entries[name] = {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
            }
    shards, layout = _pack(tensors, max_shard_bytes - 64 * 1024)  # room for each file's header
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, entry in entries.items():
        keys = [name + ".int8", name + ".scale"] if entry["dtype"] == "int8" else [name]
        entry["parts"] = {
            key.removeprefix(name).lstrip(".") or "value": [
                {"file": names[p["shard"]], "key": p["key"], "rows": p["rows"]} for p in layout[key]
            ]
            for key in keys
        }

    out_dir = Path(out_dir)
    with _writing_to(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        with _writing_to(out_dir):
            files: dict[str, dict[str, Any]] = {}
            for file_name, shard in zip(names, shards, strict=True):
                path = staging / file_name
                save_file(shard, str(path), metadata={"format": ARTIFACT_FORMAT})
                path.chmod(0o644)  # readable by a container's non-root user
                files[file_name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            index = {
                "format": ARTIFACT_FORMAT,
                "format_version": ARTIFACT_VERSION,
                "model": {"architecture": ARCHITECTURE, "args": ckpt["model"]["args"]},
                "classes": ckpt["classes"],
                "preprocessing": ckpt["preprocessing"],
                "recipe": ckpt.get("recipe"),
                "config": ckpt.get("config"),
                "epoch": ckpt.get("epoch"),
                "metrics": ckpt.get("metrics"),
                "best": ckpt.get("best"),
                "test": ckpt.get("test"),
                "data": ckpt.get("data"),
                "versions": ckpt.get("versions"),
                "quantization": QUANTIZATION,
                "tensors": entries,
                "files": files,
                **(extra or {}),
            }
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
            total = sum(f["bytes"] for f in files.values()) + (staging / INDEX_NAME).stat().st_size
        yield ExportResult(staging, files, total)
        with _writing_to(out_dir):
            # Keep a model card or other files a user put in the folder; replace only our files.
            if out_dir.exists():
                for old in out_dir.glob("model-*-of-*.safetensors"):
                    old.unlink()
            out_dir.mkdir(exist_ok=True)
            for file_name in [*names, INDEX_NAME]:
                os.replace(staging / file_name, out_dir / file_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _writing_to(out_dir: Path) -> Iterator[None]:
    """An OSError while writing the artifact (a file where the folder should be, no permission,
    a full disk) as one UserError naming the folder; errors of the caller's checks pass as they
    are."""
    try:
        yield
    except OSError as exc:
        raise UserError(
            f"cannot write the artifact to {out_dir}: {exc.strerror or exc}; choose another --out"
        ) from None


def read_index(folder: Path) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {INDEX_NAME}; it is not an exported model folder")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    check_header(
        index, path, ARTIFACT_FORMAT, ARTIFACT_VERSION, what="artifact index",
        hint="export one with python -m training.export",
    )  # fmt: skip
    missing = [
        k for k in ("model", "classes", "preprocessing", "tensors", "files") if k not in index
    ]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; re-export the model")
    return index


def verify_files(folder: Path, index: dict[str, Any]) -> None:
    """Every shard present with its recorded size and sha256, else one clear error."""
    for file_name, meta in index["files"].items():
        path = Path(folder) / file_name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; restore it (git checkout) or re-export")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, expected {meta['bytes']} (truncated?); "
                "restore it or re-export"
            )
        if sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {INDEX_NAME} (altered?)")


def load_artifact_state(folder: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    verify_files(folder, index)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for file_name in index["files"]:
            shards[file_name] = load_file(str(Path(folder) / file_name))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read a shard in {folder}: {exc}") from None

    def gather(parts: list[dict[str, Any]]) -> torch.Tensor:
        pieces = [shards[p["file"]][p["key"]] for p in parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    state: dict[str, torch.Tensor] = {}
    for name, entry in index["tensors"].items():
        try:
            if entry["dtype"] == "int8":
                value = dequantize(gather(entry["parts"]["int8"]), gather(entry["parts"]["scale"]))
            else:
                value = gather(entry["parts"]["value"])
        except KeyError as exc:
            raise CheckpointError(
                f"{folder}: tensor {name} is incomplete ({exc} missing)"
            ) from None
        if list(value.shape) != entry["shape"]:
            raise CheckpointError(
                f"{folder}: tensor {name} has shape {list(value.shape)}, expected {entry['shape']}"
            )
        state[name] = value
    return state


@dataclass
class InferenceModel:
    """A model ready to serve, from either format, with what the app reports about it."""

    model: AlexNet
    classes: list[str]
    preprocessing: Preprocessing
    info: dict[str, Any] = field(default_factory=dict)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def load_for_inference(path: Path) -> InferenceModel:
    """A training checkpoint file (last.pt/best.pt) or an artifact folder (or its model.json)."""
    path = Path(path)
    if path.is_dir() or path.name == INDEX_NAME:
        folder = path if path.is_dir() else path.parent
        index = read_index(folder)
        model = AlexNet(AlexNetConfig.from_dict(index["model"]["args"]))
        try:
            model.load_state_dict(load_artifact_state(folder, index))
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not fit the network: {exc}") from None
        kind, checksum, source = "artifact", sha256_file(folder / INDEX_NAME), index
    else:
        ckpt = load_checkpoint(path)
        model = build_model(ckpt)
        kind, checksum, source = "training-checkpoint", sha256_file(path), ckpt
    classes = list(source["classes"])
    if len(classes) != model.config.num_classes:
        raise CheckpointError(
            f"{path}: {len(classes)} class names for {model.config.num_classes} outputs"
        )
    model.eval()
    best = source.get("best") or {}
    metrics = source.get("metrics") or []
    # An artifact's own accuracy (measured after quantization, at export) takes precedence.
    measured = source.get("export", {}).get("test") if kind == "artifact" else None
    test = measured or source.get("test") or {}
    info = {
        "path": str(path),
        "format": kind,
        "sha256": checksum,
        "architecture": ARCHITECTURE,
        "model_args": dict(source["model"]["args"]),
        "recipe": source.get("recipe"),
        "epoch": source.get("epoch"),
        "validation_accuracy": _round(metrics[-1]["val_acc"]) if metrics else None,
        "best_validation": best or None,
        "test_accuracy": _round(test.get("accuracy")),
        "test_per_class": test.get("per_class"),
        "checkpoint_test_accuracy": _round((source.get("test") or {}).get("accuracy")),
        "quantization": source.get("quantization") if kind == "artifact" else None,
    }
    return InferenceModel(model, classes, preprocessing_of(source), info)
