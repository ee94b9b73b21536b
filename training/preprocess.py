"""What an image becomes before it reaches the network: defined once, used by training and the app.

Two stages, split where the batch forms:
1. on the CPU, per image: decode, normalize the mode, reduce to the training resolution
   (32x32, antialiased) -> uint8 tensor [3, 32, 32]. CIFAR-10 images are already 32x32, so for
   them this is a plain decode; any other image is brought to what training saw.
2. on the device, per batch: resize 32 -> 227 (bilinear) and normalize with CIFAR-10 statistics
   (`InputTransform`). Training runs exactly this module on its GPU-resident uint8 data set, so a
   served image sees the pixels training saw.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
MAX_SIZE = 4096  # pixels per side, for either stage: a bound on what a model file may ask for

# PIL modes that carry transparency; they are flattened onto white, the way a browser shows them.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing contract, stored in every checkpoint and read back by the app."""

    source_size: int = 32  # images are reduced to this square size on the CPU (uint8)
    input_size: int = 227  # and resized to this on the device, bilinear
    mean: tuple[float, float, float] = field(default=CIFAR10_MEAN)  # per channel, on 0..1
    std: tuple[float, float, float] = field(default=CIFAR10_STD)
    downscale: str = "pil-bilinear-antialiased"  # how stage 1 reduces a larger image
    upscale: str = "bilinear"  # how stage 2 resizes (torch.nn.functional.interpolate)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        prep = cls(
            source_size=_whole(data["source_size"], "source_size"),
            input_size=_whole(data["input_size"], "input_size"),
            mean=_numbers(data["mean"], "mean"),  # type: ignore[arg-type]
            std=_numbers(data["std"], "std"),  # type: ignore[arg-type]
            downscale=str(data.get("downscale", cls.downscale)),
            upscale=str(data.get("upscale", cls.upscale)),
        )
        if (prep.downscale, prep.upscale) != (cls.downscale, cls.upscale):
            raise ValueError(
                f"unsupported preprocessing {prep.downscale!r}/{prep.upscale!r}; "
                f"this version implements {cls.downscale!r}/{cls.upscale!r}"
            )
        for name in ("source_size", "input_size"):
            if not 1 <= getattr(prep, name) <= MAX_SIZE:
                raise ValueError(f"{name} is {getattr(prep, name)}, not in 1..{MAX_SIZE}")
        for name in ("mean", "std"):
            values = getattr(prep, name)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), not {list(values)}")
        if min(prep.std) <= 0:
            raise ValueError(f"std must be positive, not {list(prep.std)}")
        return prep


def _numbers(value: Any, name: str) -> tuple[float, ...]:
    # A list of numbers, as written: float() took the string "123" as (1.0, 2.0, 3.0).
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{name} must be a list of numbers (R, G, B), not {value!r}")
    return tuple(float(v) for v in value)


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number of pixels, not {value!r}")
    return value


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> upright 8-bit RGB: EXIF orientation, first frame, alpha, 16-bit, CMYK."""
    if getattr(image, "is_animated", False):  # n_frames would walk every frame of a GIF
        image.seek(0)  # animated GIF/WebP/PNG: the first frame
    # EXIF that Pillow cannot parse (SyntaxError for a bad PNG eXIf chunk, struct.error, ...)
    # says nothing usable about the orientation; the pixels decode fine, and are kept as stored.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image) or image
    # A PNG tRNS chunk: one colour (grey level, RGB triple) or palette entries are transparent.
    # PNG optimisers store an RGBA image with on/off alpha that way, so it is flattened onto
    # white like alpha (it was kept as stored: black where the RGBA original showed white).
    transparent = image.info.get("transparency")
    if image.mode == "RGB" and isinstance(transparent, tuple) and max(transparent) > 255:
        # A 16-bit RGB PNG's colour: Pillow reduces the pixels to 8 bits but compares them with
        # its low bytes, which whitened other colours. Left unapplied (its pixels as stored).
        transparent = None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or float) grayscale: PIL's convert("L") would clip at 255, so scale instead.
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max(initial=0))
        if image.mode == "F":
            scale = 255.0 if peak <= 1.0 else 1.0  # float images come as 0..1 or 0..255
        elif image.mode == "I" and peak <= 255:
            scale = 1.0  # 8-bit values stored in a 32-bit container
        else:
            scale = 255.0 / 65535.0
        gray = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
        if isinstance(transparent, int) and image.mode != "F":
            alpha = np.where(array == transparent, 0, 255).astype(np.uint8)
            image = Image.merge("LA", (gray, Image.fromarray(alpha, mode="L")))
        else:
            image = gray
    elif transparent is not None and image.mode in ("P", "L", "RGB", "1"):
        image = image.convert("RGBA")  # Pillow applies tRNS here
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def reduce_image(image: Image.Image, size: int = 32) -> torch.Tensor:
    """Stage 1: a PIL image -> uint8 tensor [3, size, size] at the training resolution."""
    image = to_rgb(image)
    if image.size != (size, size):
        # PIL widens the filter support when shrinking, so this is antialiased.
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_image(source: str | Path | IO[bytes], size: int = 32) -> torch.Tensor:
    """Open and reduce one image file (the data-set loader's path; the app adds size checks)."""
    with Image.open(source) as image:
        return reduce_image(image, size)


class InputTransform(nn.Module):
    """Stage 2, on the device: uint8 [B, 3, s, s] -> normalized float [B, 3, 227, 227]."""

    def __init__(self, prep: Preprocessing | None = None) -> None:
        super().__init__()
        self.prep = prep or Preprocessing()
        # Folded into one multiply-add on 0..255 values: (x/255 - mean)/std = x*a + b.
        std = torch.tensor(self.prep.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(self.prep.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> torch.Tensor:
        x = images.to(torch.float32)
        size = self.prep.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = torch.addcmul(self.shift, x, self.scale).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
