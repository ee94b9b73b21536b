"""Uploads for the app tests: small generated images encoded in real file formats."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from tests.helpers import class_image


def noise(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """An RGB uint8 array [h, w, 3] of random pixels with one dominant channel (seeded), so
    that different seeds give clearly different images (and predictions)."""
    return class_image(seed % 3, np.random.default_rng(seed), size)


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(seed: int = 0, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    return encode(Image.fromarray(noise(seed, size), mode="RGB").convert(mode), "PNG")


def jpeg(seed: int = 0, size: tuple[int, int] = (32, 32), **options: Any) -> bytes:
    return encode(Image.fromarray(noise(seed, size), mode="RGB"), "JPEG", quality=95, **options)


def upload(data: bytes, name: str = "image.png", field: str = "file") -> dict[str, Any]:
    """`files=` for httpx/TestClient: one multipart file in `field`."""
    return {field: (name, data, "application/octet-stream")}


def uploads(*datas: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    """`files=` for /predict/batch: each in field 'files', named 0.png, 1.png, ..."""
    return [("files", (f"{i}.png", d, "application/octet-stream")) for i, d in enumerate(datas)]
