"""The training step and evaluation, on GPU-resident uint8 data.

One training step is: gather the batch's images by index, augment, resize to 227 and normalize
(`InputTransform`, shared with the app), forward under bf16 autocast, backward, SGD update, and
accumulate the epoch's loss and accuracy on the device. Nothing in it waits for the host, so on
a single GPU the whole step is captured once as a CUDA graph and replayed: one launch per step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.sgd import sgd

from training.data import Split, crop_flip
from training.errors import UserError
from training.folders import class_difference
from training.model import use_space_to_depth
from training.preprocess import InputTransform

if TYPE_CHECKING:  # artifact needs nothing from here; only the type is named
    from training.artifact import InferenceModel


@dataclass(frozen=True)
class Precision:
    """How the model runs: autocast dtype (None = off), memory layout, and the dtype its
    weights were cast to (inference may cast them to bf16 once instead of autocasting)."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    weights_dtype: torch.dtype = torch.float32

    @property
    def input_dtype(self) -> torch.dtype:
        return self.amp_dtype or self.weights_dtype

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No autocast weight cache: cached casts would be stale inside a replayed CUDA graph.
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)


class EarlySGD:
    """The SGD update of some parameters (the fc head's: 94% of the weights), run the moment
    their gradients are ready instead of after the whole backward pass; on CUDA on a side
    stream, so that it overlaps the convolutions' backward.

    Why: at batch 64, 40% of a step does not shrink with the batch (README's pipeline table),
    and the update is a known part of that: it reads and writes every weight, gradient and
    momentum (about 1.2 GB for the 58 M parameters), bound by memory bandwidth, where the
    convolutions' backward should be mostly arithmetic (bench.profile_step measures what the
    overlap saves). The arithmetic is SGD's own (`torch.optim.sgd.sgd`, with the optimizer's
    group settings and momentum buffers), so the weights are the same, bit for bit. `step`
    then updates the other parameters with the optimizer's step and joins the side stream.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        if not isinstance(optimizer, torch.optim.SGD) or len(optimizer.param_groups) != 1:
            raise ValueError("EarlySGD takes an SGD optimizer with one parameter group")
        group = optimizer.param_groups[0]
        if group["maximize"] or group["dampening"]:
            raise ValueError("EarlySGD implements SGD without maximize or dampening")
        self.optimizer = optimizer
        self.params = params
        device = params[0].device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Kept to remove: left on the parameters, every later backward (a user's own loop on
        # the trained model, a second TrainStep) would update them as a side effect.
        self.hooks = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    def _update(self, p: torch.Tensor) -> None:
        group = self.optimizer.param_groups[0]
        state = self.optimizer.state[p]
        buffers = [state.get("momentum_buffer")]
        grad = p.grad
        assert grad is not None
        if self.side is None:
            context: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        else:
            # The backward runs on the forward's stream; fork from it (the gradient is ready
            # there) and rejoin it in `step`.
            self.side.wait_stream(torch.cuda.current_stream(p.device))
            context = torch.cuda.stream(self.side)
        with context, torch.no_grad():
            sgd(
                [p], [grad], buffers,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=0.0, nesterov=group["nesterov"], maximize=False,
                foreach=group["foreach"], fused=group["fused"],
            )  # fmt: skip
        if group["momentum"] != 0:
            state["momentum_buffer"] = buffers[0]  # created by the first update

    def step(self) -> None:
        """The optimizer's step for every other parameter: these are hidden from it (their
        gradients are kept, not freed, while a side stream may still read them)."""
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            self.optimizer.step()
        finally:
            for p, grad in zip(self.params, grads, strict=True):
                p.grad = grad
        if self.side is not None:
            torch.cuda.current_stream(self.params[0].device).wait_stream(self.side)

    def remove(self) -> None:
        """Stop updating during backward passes (the parameters keep their values)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


class TrainStep:
    """One optimizer step on the images whose indices are in `self.index`."""

    def __init__(
        self,
        model: nn.Module,
        transform: InputTransform,
        optimizer: torch.optim.Optimizer,
        train: Split,
        *,
        local_batch_size: int,
        label_smoothing: float,
        augment: str,
        crop_padding: int,
        precision: Precision,
        early_sgd: list[torch.Tensor] | None = None,
    ) -> None:
        """`early_sgd`: parameters to update as soon as their gradients are ready (EarlySGD)."""
        self.model = model
        self.transform = transform
        self.optimizer = optimizer
        self.train = train
        self.device = train.images.device
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.augment = augment
        self.crop_padding = crop_padding
        self.precision = precision
        self.index = torch.zeros(local_batch_size, dtype=torch.long, device=self.device)
        # Running sums for the epoch, kept on the device so no step synchronizes.
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.early = EarlySGD(optimizer, early_sgd) if early_sgd else None

    def _step(self) -> None:
        images = self.train.images[self.index]
        labels = self.train.labels[self.index]
        if self.augment == "crop-flip":
            images = crop_flip(images, self.crop_padding)
        x = self.transform(
            images,
            dtype=self.precision.input_dtype,
            channels_last=self.precision.channels_last,
        )
        with self.precision.autocast(self.device):
            logits = self.model(x)
            loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.early is not None:
            self.early.step()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach()
            self.correct += (logits.argmax(1) == labels).sum()

    def __call__(self, index: torch.Tensor) -> None:
        self.index.copy_(index, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.steps += 1

    def capture_graph(self, model_to_restore: nn.Module) -> None:
        """Capture `_step` as a CUDA graph, leaving model and optimizer as they were.

        Capture needs a few warm-up steps first (cuDNN autotuning, lazy allocations); they
        change the weights, so weights, buffers and momentum are snapshotted before and put
        back after, in place (the graph holds their addresses). Zeroed momentum is the fresh
        state: with dampening 0, SGD's first step sets buffer = grad, which is what m*0 + grad
        gives.
        """
        params_state = {k: v.detach().clone() for k, v in model_to_restore.state_dict().items()}
        momentum_before = {
            p: (s["momentum_buffer"].clone() if s.get("momentum_buffer") is not None else None)
            for p, s in self.optimizer.state.items()
        }
        self.index.copy_(torch.arange(len(self.index), device=self.device) % len(self.train))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._step()
        with torch.no_grad():
            for key, value in model_to_restore.state_dict().items():
                value.copy_(params_state[key])
            for p, state in self.optimizer.state.items():
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    continue
                before = momentum_before.get(p)
                if before is None:
                    buffer.zero_()
                else:
                    buffer.copy_(before)
        self.graph = graph
        self.reset_stats()

    def close(self) -> None:
        """Detach from the model (EarlySGD's hooks), which then trains only through others."""
        if self.early is not None:
            self.early.remove()

    def reset_stats(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.steps = 0


@torch.inference_mode()
def forward_logits(
    model: nn.Module, transform: InputTransform, images: torch.Tensor, precision: Precision
) -> torch.Tensor:
    """Logits for uint8 images [B, 3, s, s] on the model's device: the one inference path,
    used by evaluation here and by the app's batches."""
    x = transform(images, dtype=precision.input_dtype, channels_last=precision.channels_last)
    with precision.autocast(images.device):
        return model(x)


def predict(
    model: nn.Module,
    transform: InputTransform,
    images: torch.Tensor,
    *,
    batch_size: int,
    precision: Precision,
) -> torch.Tensor:
    """Class predictions (int64, on the CPU) for uint8 images [N, 3, s, s] on the model device."""
    was_training = model.training
    model.eval()
    out = [
        forward_logits(model, transform, images[start : start + batch_size], precision).argmax(1)
        for start in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """[true, predicted] counts."""
    flat = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy_report(labels: torch.Tensor, predictions: torch.Tensor, classes: list[str]) -> dict:
    """Top-1 accuracy (percent), per-class accuracy and the confusion matrix, as plain data."""
    matrix = confusion_matrix(labels, predictions, len(classes))
    per_class = matrix.diag().double() / matrix.sum(1).clamp(min=1).double() * 100
    return {
        "accuracy": float(matrix.diag().sum()) / max(1, len(labels)) * 100,
        "images": len(labels),
        "per_class": {name: round(float(a), 2) for name, a in zip(classes, per_class, strict=True)},
        "confusion": matrix.tolist(),
    }


def evaluate(
    model: nn.Module,
    transform: InputTransform,
    split: Split,
    classes: list[str],
    *,
    batch_size: int,
    precision: Precision,
) -> dict:
    predictions = predict(
        model, transform, split.images, batch_size=batch_size, precision=precision
    )
    return accuracy_report(split.labels, predictions, classes)


INFERENCE_PRECISIONS = ("fp32", "bf16")


def prepare_for_inference(model: nn.Module, device: torch.device, precision: str) -> Precision:
    """Move `model` to `device` for inference, in place: eval mode, channels_last, and for
    "bf16" weights cast once (faster than autocast on CPU, and no per-call cast on CUDA)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {INFERENCE_PRECISIONS}, not {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    use_space_to_depth(model, device.type == "cuda")
    return Precision(amp_dtype=None, channels_last=True, weights_dtype=dtype)


def check_classes(data_classes: list[str], model_classes: list[str]) -> None:
    """UserError unless the data's classes are the model's, in the same order."""
    if data_classes != model_classes:
        raise UserError(
            "the data's classes are not the model's: "
            + class_difference(data_classes, "the data", model_classes, "the model")
        )


def evaluate_model(
    loaded: InferenceModel,
    split: Split,
    classes: list[str],
    *,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 500,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Accuracy report and per-image predictions of `loaded` on `split` (moved to `device`)."""
    check_classes(classes, loaded.classes)
    prec = prepare_for_inference(loaded.model, device, precision)
    transform = InputTransform(loaded.preprocessing).to(device)
    images = split.images.to(device)
    start = time.perf_counter()
    predictions = predict(loaded.model, transform, images, batch_size=batch_size, precision=prec)
    seconds = time.perf_counter() - start
    report = accuracy_report(split.labels, predictions, classes)
    report.update(precision=precision, device=str(device), images_per_s=len(split) / seconds)
    return report, predictions
