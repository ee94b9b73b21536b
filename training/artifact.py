"""The serving artifact (`weights/`): int8 weights in checksummed safetensors shards, and loading
either it or a full training checkpoint for inference.

Layout of an artifact folder:
    model.json                          index + everything the app needs (classes, preprocessing,
                                        accuracy, recipe), and the sha256 of every shard
    model-00001-of-0000N-<sha>.safetensors  tensors, each shard at most 15 MiB (fits a git
                                        host), named for its content (the first 12 hex
                                        digits of its sha256)

Conv and linear weights are quantized per output channel, symmetric int8 (weight-only): the
model is dequantized to float32 at load, so inference code is the same for both formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from training.checkpoint import (
    CheckpointError,
    check_header,
    fsync_dir,
    load_checkpoint_and_digest,
    load_weights,
    preprocessing_of,
    state_dict_of,
)
from training.errors import UserError, refuse_a_dangling_link
from training.metadata import (
    MetadataError,
    accuracy_report,
    class_names,
    model_config,
    non_finite,
    optional,
    val_acc_at,
)
from training.model import ARCHITECTURE, AlexNet, fits_input
from training.preprocess import Preprocessing
from training.runlock import folder_lock

ARTIFACT_FORMAT = "alexnet-serve/artifact"
ARTIFACT_VERSION = 1
INDEX_NAME = "model.json"
MAX_SHARD_BYTES = 15 * 1024 * 1024
QUANTIZATION = "int8 weight-only, symmetric, per output channel (conv and linear weights)"
# Ours to replace in an artifact folder (the -<sha> suffix is absent from older exports).
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}(-[0-9a-f]{12})?\.safetensors")
_CHECKSUM_NAMED = re.compile(r"model-\d{5}-of-\d{5}-[0-9a-f]{12}\.safetensors")
STAGING_PREFIX = ".export-"
# What tempfile.mkdtemp(prefix=STAGING_PREFIX) names a staging folder: 8 characters of its
# alphabet. Only these, holding the marker file (or nothing but an export's files), are swept
# as stale: not a user's own folder that shares the prefix.
STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}")
STAGING_MARKER = ".alexnet-serve-staging"


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
    """The float32 state dict the artifact will load as, computed without writing it (the
    export itself measures the files it staged; the tests compare the two)."""
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

    Written into a temporary folder, then swapped in (see `staged_artifact`), so a failed
    export never leaves a half-written artifact behind.
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
    """Write the artifact into a temporary folder inside `out_dir` and yield it (its `out_dir`
    is that folder) for checks. It replaces the artifact in `out_dir` when the block ends
    normally; if the block raises, `out_dir` is left as it was. One export at a time per
    folder (a lock on it), and a kill at any moment leaves the old artifact or the new one."""
    out_dir = Path(out_dir)
    busy = (  # the folder lock is also a training run's (runlock.run_lock)
        f"{out_dir} is being written by another export or a training run; wait for it to end "
        "or choose another --out"
    )
    refuse_a_dangling_link("--out", out_dir)
    with ExitStack() as held:
        with writing_to(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)  # a file in the way fails here, early
            held.enter_context(folder_lock(out_dir, busy))
            replaced = _replaceable_shards(out_dir)
            for stale in out_dir.glob(f"{STAGING_PREFIX}*"):  # left by a killed export
                if _stale_staging(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            # Inside --out: the same file system (a mount point or a symlinked folder too),
            # so every move below is a rename.
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
            held.callback(shutil.rmtree, staging, ignore_errors=True)
            (staging / STAGING_MARKER).touch()
        shards, names, entries = _quantized_shards(ckpt["model"]["state_dict"], max_shard_bytes)
        with writing_to(out_dir):
            files = _write_shards(staging, names, shards, entries)
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
        with writing_to(out_dir):
            _install(staging, out_dir, list(files), replaced)


def _quantized_shards(
    state: dict[str, torch.Tensor], max_shard_bytes: int
) -> tuple[list[dict[str, torch.Tensor]], list[str], dict[str, dict[str, Any]]]:
    """The state dict quantized and packed into shards: their tensors, their draft file names,
    and the index entry of each tensor (dtype, shape, where its parts are)."""
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
    return shards, names, entries


def _write_shards(
    staging: Path,
    names: list[str],
    shards: list[dict[str, torch.Tensor]],
    entries: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Save each shard under its final name (its checksum in it) and point `entries` there."""
    files: dict[str, dict[str, Any]] = {}
    final_name: dict[str, str] = {}
    for draft, shard in zip(names, shards, strict=True):
        path = staging / draft
        # Serialized here, written by Python: a full disk is then an OSError (safetensors'
        # own writer raised its SafetensorError, a traceback), and any folder name works.
        path.write_bytes(save_safetensors(shard, metadata={"format": ARTIFACT_FORMAT}))
        path.chmod(0o644)  # readable by a container's non-root user
        digest = sha256_file(path)
        final = draft.removesuffix(".safetensors") + f"-{digest[:12]}.safetensors"
        files[final] = {"sha256": digest, "bytes": path.stat().st_size}
        path.rename(staging / final)
        final_name[draft] = final
    for entry in entries.values():
        for parts in entry["parts"].values():
            for part in parts:
                part["file"] = final_name[part["file"]]
    return files


def _replaceable_shards(out_dir: Path) -> set[str]:
    """The shards an export into `out_dir` may remove once its own are in. Where an artifact of
    ours is there: every shard-named file (its own, and those of an export killed at the
    switch). Where none is: only checksum-named ones (a kill during an install left them). A
    model.json that is not ours is refused: its files are not ours to replace (an export
    deleted another format's model-00001-of-00002.safetensors)."""
    shards = {p.name for p in out_dir.iterdir() if SHARD_NAME.fullmatch(p.name)}
    index_path = out_dir / INDEX_NAME
    if not index_path.exists() and not index_path.is_symlink():
        return {n for n in shards if _CHECKSUM_NAMED.fullmatch(n)}
    way_on = "choose another --out"
    if index_path.is_symlink() and not index_path.exists():
        problem = f"is a symbolic link to {os.readlink(index_path)}, which does not exist"
    else:
        try:
            index = json.loads(index_path.read_bytes())
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        except (ValueError, RecursionError):
            problem = "is not valid JSON"
            way_on += (
                " (if it is a damaged export of this project, remove it and the "
                "model-*.safetensors files beside it first)"
            )
        else:
            if isinstance(index, dict) and index.get("format") == ARTIFACT_FORMAT:
                return shards
            problem = "is not a model exported by this project, and an export would replace it"
            way_on += " (or remove that file first)"
    raise UserError(f"{index_path} {problem}; {way_on}")


def _stale_staging(folder: Path) -> bool:
    """A staging folder a killed export left: marked as ours, or (made before the marker, or
    killed before writing it) holding nothing but shards and a model.json."""
    if not STAGING_NAME.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / STAGING_MARKER).is_file():
        return True
    return all(
        p.is_file()
        and not p.is_symlink()
        and (SHARD_NAME.fullmatch(p.name) or p.name == INDEX_NAME)
        for p in folder.iterdir()
    )


def _install(staging: Path, out_dir: Path, shards: list[str], replaced: set[str]) -> None:
    """Move the staged artifact into `out_dir` so that a kill at any moment leaves a folder
    that loads: the new shards go in beside the old ones (their names differ: they carry
    their checksums), then model.json is replaced in one rename (the switch), and only then
    are the old shards (`replaced`) that nothing references any more removed. Other files
    (a model card) stay."""
    for name in shards:
        os.replace(staging / name, out_dir / name)
    fsync_dir(out_dir)
    os.replace(staging / INDEX_NAME, out_dir / INDEX_NAME)
    fsync_dir(out_dir)
    for name in replaced - set(shards):
        (out_dir / name).unlink(missing_ok=True)


@contextmanager
def writing_to(out_dir: Path) -> Iterator[None]:
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
    return _index_of(folder, _index_bytes(folder))


def _index_bytes(folder: Path) -> bytes:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        found = [n for n in ("best.pt", "last.pt") if (Path(folder) / n).is_file()]
        hint = (
            f" but a training run's: pass {' or '.join(str(Path(folder) / n) for n in found)}"
            if found
            else ""
        )  # the run's folder, where the README's examples name its checkpoint file
        raise CheckpointError(
            f"{folder} has no {INDEX_NAME}; it is not an exported model folder{hint}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _index_of(folder: Path, data: bytes) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {str(exc)[:200]}") from None
    check_header(
        index, path, ARTIFACT_FORMAT, ARTIFACT_VERSION, what="artifact index",
        hint="export one with python -m training.export",
    )  # fmt: skip
    missing = [
        k for k in ("model", "classes", "preprocessing", "tensors", "files") if k not in index
    ]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; re-export the model")
    try:
        _check_layout(index)
    except MetadataError as exc:
        raise CheckpointError(f"{path}: {exc}; re-export the model") from None
    return index


def _check_layout(index: dict[str, Any]) -> None:
    """The shard table and the tensor table are what `load_artifact_state` walks: check their
    shape first, so a damaged index is one line, not a KeyError deep inside loading."""
    files, tensors = index["files"], index["tensors"]
    if not isinstance(files, dict) or not files:
        raise MetadataError("'files' is not an object of shard names")
    for name, meta in files.items():
        if Path(name).name != name or name in (".", "..") or "\\" in name:
            # Read only from the folder itself: never a path elsewhere on the disk.
            raise MetadataError(f"shard {name!r} is not a plain file name in the folder")
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and isinstance(meta.get("bytes"), int)
            and not isinstance(meta.get("bytes"), bool)
        ):
            raise MetadataError(f"'files.{name}' needs a sha256 (string) and bytes (integer)")
    if not isinstance(tensors, dict) or not tensors:
        raise MetadataError("'tensors' is not an object of tensor names")
    for name, entry in tensors.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in entry["shape"])
            and isinstance(entry.get("parts"), dict)
        ):
            raise MetadataError(f"'tensors.{name}' needs a shape (integers) and parts")
        roles = ("int8", "scale") if entry.get("dtype") == "int8" else ("value",)
        for role in roles:
            parts = entry["parts"].get(role)
            if not isinstance(parts, list) or not parts:
                raise MetadataError(f"'tensors.{name}.parts.{role}' is missing or empty")
            for part in parts:
                if not isinstance(part, dict) or part.get("file") not in files:
                    raise MetadataError(
                        f"'tensors.{name}.parts.{role}' names a shard that 'files' does not list"
                    )
                if not isinstance(part.get("key"), str):
                    raise MetadataError(f"'tensors.{name}.parts.{role}' lacks a tensor key")
                rows = part.get("rows")
                if not (
                    isinstance(rows, list)
                    and len(rows) == 2
                    and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
                ):
                    raise MetadataError(
                        f"'tensors.{name}.parts.{role}' lacks its rows [start, end]"
                    )


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
            # From bytes, not a path: safetensors takes only UTF-8 paths, a folder may not be.
            shards[file_name] = load_safetensors((Path(folder) / file_name).read_bytes())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read a shard in {folder}: {exc}") from None

    def gather(name: str, parts: list[dict[str, Any]]) -> torch.Tensor:
        pieces, at = [], 0
        for part in parts:
            piece = shards[part["file"]][part["key"]]
            start, end = part["rows"]
            # The pieces in order, each the rows it says: swapped parts of a split tensor fit
            # together as well, and loaded other weights without a word.
            if (start, end) != (at, at + (piece.shape[0] if piece.dim() else 1)):
                raise CheckpointError(
                    f"{folder}: tensor {name}'s part {part['key']} is not rows {start}-{end} "
                    "in order; re-export the model"
                )
            pieces.append(piece)
            at = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    state: dict[str, torch.Tensor] = {}
    for name, entry in index["tensors"].items():
        try:
            if entry["dtype"] == "int8":
                value = dequantize(
                    gather(name, entry["parts"]["int8"]), gather(name, entry["parts"]["scale"])
                )
            else:
                value = gather(name, entry["parts"]["value"])
        except KeyError as exc:
            raise CheckpointError(
                f"{folder}: tensor {name} is incomplete ({exc} missing)"
            ) from None
        except RuntimeError as exc:  # pieces that do not fit together
            raise CheckpointError(f"{folder}: tensor {name} cannot be rebuilt: {exc}") from None
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
    """A training checkpoint file (last.pt/best.pt) or an artifact folder (or its model.json).
    Everything the app will serve from it is checked here, the metadata before the weights
    are read: a damaged file is one error line."""
    path = Path(path)
    if not (path.is_dir() or path.name == INDEX_NAME):
        return checkpoint_for_inference(*load_checkpoint_and_digest(path), path)
    folder = path if path.is_dir() else path.parent
    data, retries = _index_bytes(folder), 2
    while True:
        try:
            return _load_artifact(folder, data, path)
        except CheckpointError:
            # An export installed another model meanwhile (model.json switched, the shards it
            # named removed): load that one instead of calling the folder damaged.
            now = _index_bytes(folder)
            if now == data or retries == 0:
                raise
            data, retries = now, retries - 1


def _load_artifact(folder: Path, data: bytes, path: Path) -> InferenceModel:
    """The artifact that this model.json content (`data`) describes."""
    index = _index_of(folder, data)
    served = _described(index, "artifact", hashlib.sha256(data).hexdigest(), path)
    load_weights(served.model, load_artifact_state(folder, index), folder)
    return _finite(served, path)


def checkpoint_for_inference(
    ckpt: dict[str, Any], checksum: str | None, path: Path
) -> InferenceModel:
    """The model of a loaded training checkpoint (`checksum`: of the bytes it was loaded from),
    checked as `load_for_inference` checks."""
    served = _described(ckpt, "training-checkpoint", checksum or sha256_file(path), path)
    load_weights(served.model, state_dict_of(ckpt), path)
    return _finite(served, path)


def _refused(path: Path, exc: MetadataError, kind: str) -> CheckpointError:
    hint = "re-export it" if kind == "artifact" else "train it again or pass another"
    return CheckpointError(f"{path}: {exc}; {hint}")


def _finite(served: InferenceModel, path: Path) -> InferenceModel:
    broken = non_finite(served.model.state_dict())
    if broken is not None:
        raise _refused(
            path,
            MetadataError(f"{broken} holds NaN or infinite values (a run that diverged?)"),
            served.info["format"],
        )
    served.model.eval()
    return served


def _described(source: dict[str, Any], kind: str, checksum: str, path: Path) -> InferenceModel:
    """The network (its weights not loaded yet) and everything the app reports about it."""
    try:
        config = model_config(source["model"])
        classes = class_names(source.get("classes"), config.num_classes)
        preprocessing = preprocessing_of(source)
        if not fits_input(preprocessing.input_size):
            raise MetadataError(
                f"'preprocessing.input_size' {preprocessing.input_size} does not fit the "
                "network (227 does)"
            )
        best = optional(source, "best", dict) or {}
        epoch = optional(source, "epoch", int)
        # What is served is an artifact's int8 weights: its accuracy is the one measured after
        # quantization, at export, or unknown (an export without test data); the checkpoint's
        # own figure is reported apart.
        export = (optional(source, "export", dict) or {}) if kind == "artifact" else {}
        measured = accuracy_report(export.get("test"), "export.test")
        recorded = accuracy_report(source.get("test"), "test")
        test = measured if kind == "artifact" else recorded
        info = {
            "path": str(path),
            "format": kind,
            "sha256": checksum,
            "architecture": ARCHITECTURE,
            "model_args": dict(source["model"]["args"]),
            "recipe": optional(source, "recipe", str),
            "epoch": epoch,
            "validation_accuracy": _round(val_acc_at(source.get("metrics"), epoch)),
            "best_validation": best or None,
            "test_accuracy": _round(test.get("accuracy")),
            "test_per_class": test.get("per_class"),
            "checkpoint_test_accuracy": _round(recorded.get("accuracy")),
            "quantization": optional(source, "quantization", str) if kind == "artifact" else None,
        }
    except MetadataError as exc:
        raise _refused(path, exc, kind) from None
    return InferenceModel(AlexNet(config), classes, preprocessing, info)
