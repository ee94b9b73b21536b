"""What a model file must hold to be served, checked once when it is loaded.

Both formats (a training checkpoint, an exported model.json) carry the same metadata: model
arguments, class names, preprocessing, recipe, metrics and accuracy. A damaged or hand-edited
file is refused here with one line naming the field, instead of a traceback at start-up or a
500 on every request later (a class name that is a number, a recipe that is a list).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from training.errors import UserError
from training.model import AlexNetConfig

MAX_CLASSES = 100_000  # far above any classifier this serves; bounds the fc3 allocation


class MetadataError(UserError):
    """A field of a model file that is missing or of the wrong kind."""


def is_number(value: Any) -> bool:
    """A finite int or float (JSON's 1e400 is inf; its 10**400 overflows a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetadataError(f"'{name}' is {_kind(value)}, not an object")
    return value


def _kind(value: Any) -> str:
    return "missing" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


def model_config(model: Any) -> AlexNetConfig:
    """The 'model' section's arguments, as the network's configuration."""
    args = _dict(_dict(model, "model").get("args"), "model.args")
    num_classes = args.get("num_classes", AlexNetConfig.num_classes)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        raise MetadataError(f"'model.args.num_classes' is {_kind(num_classes)}, not an integer")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise MetadataError(f"'model.args.num_classes' is {num_classes}, not in 1..{MAX_CLASSES}")
    dropout = args.get("dropout", AlexNetConfig.dropout)
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise MetadataError(f"'model.args.dropout' is {_kind(dropout)}, not a number in [0, 1)")
    return AlexNetConfig.from_dict(args)


def class_names(classes: Any, num_classes: int) -> list[str]:
    """Distinct, non-empty, UTF-8 encodable names, one per output of the network."""
    if not isinstance(classes, list):
        raise MetadataError(f"'classes' is {_kind(classes)}, not a list of names")
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise MetadataError(f"'classes' holds {_kind(name)}; every class needs a name")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise MetadataError(f"class name {name!r} is not valid UTF-8") from None
    if len(set(classes)) != len(classes):
        raise MetadataError("'classes' names a class twice")
    if len(classes) != num_classes:
        raise MetadataError(f"{len(classes)} class names for {num_classes} outputs")
    return list(classes)


def optional(source: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """`source[key]` if it is of `kind` or None/absent; else a MetadataError."""
    value = source.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise MetadataError(f"'{key}' is {_kind(value)}, not {_kind_name(kind)}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def accuracy_report(report: Any, name: str) -> dict[str, Any]:
    """A test report as served: accuracy a number (or absent), per_class names to numbers."""
    if report is None:
        return {}
    report = _dict(report, name)
    accuracy = report.get("accuracy")
    if accuracy is not None and not is_number(accuracy):
        raise MetadataError(f"'{name}.accuracy' is {_kind(accuracy)}, not a number")
    per_class = report.get("per_class")
    if per_class is not None and not (
        isinstance(per_class, dict)
        and all(isinstance(k, str) and is_number(v) for k, v in per_class.items())
    ):
        raise MetadataError(f"'{name}.per_class' is not an object of class names to numbers")
    return report


def val_acc_at(metrics: Any, epoch: int | None) -> float | None:
    """The validation accuracy of the weights of `epoch` from a 'metrics' list, if any.

    A best.pt carries the whole run's metrics, and the last epoch's accuracy is not that of
    its weights. Metrics without epoch numbers, or a file not naming its epoch: the last one's;
    an epoch the metrics do not list: None."""
    if metrics is None or metrics == []:
        return None
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise MetadataError("'metrics' is not a list of per-epoch objects")
    index = len(metrics) - 1
    if epoch is not None and any("epoch" in m for m in metrics):
        found = [i for i, m in enumerate(metrics) if m.get("epoch") == epoch]
        if not found:  # not this file's epoch: another epoch's figure would be misreported
            return None
        index = found[0]
    value = metrics[index].get("val_acc")
    if value is not None and not is_number(value):
        raise MetadataError(f"'metrics[{index}].val_acc' is {_kind(value)}, not a number")
    return value


def non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, if any."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
