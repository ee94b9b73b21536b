"""Uploaded bytes -> the 32x32 uint8 tensor training used, or a clear client error.

Runs in a worker thread (never on the event loop). Checks the format and the pixel count from
the header before decoding, so a decompression bomb is refused without being expanded.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from app.limits import PIL_PIXEL_LIMIT
from training.preprocess import reduce_image

# PIL format -> the name a client knows. Pillow opens a JPEG that carries a multi-picture
# segment (many phone and camera photos) as MPO: it is a JPEG, decoded as its first picture.
ALLOWED_FORMATS = {
    "JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF",
}  # fmt: skip
# How the accepted formats' files begin (WebP: RIFF....WEBP, checked apart).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


class ImageError(ValueError):
    """An upload that is not a usable image; carries the HTTP status and an error code."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def decode_upload(data: bytes, *, max_pixels: int, size: int = 32) -> torch.Tensor:
    if not data:
        raise ImageError(400, "empty_file", "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit rules
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(
            413,
            "too_many_pixels",
            f"the image has over {PIL_PIXEL_LIMIT:,} pixels, more than this service decodes",
        ) from None
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            # An image format's signature, but too short for Pillow to identify: cut short.
            raise ImageError(
                400, "corrupt_image", "the image is truncated or corrupt (its header is cut short)"
            ) from None
        raise ImageError(
            415,
            "not_an_image",
            "the file is not an image this service reads (JPEG, PNG, WebP, BMP, GIF)",
        ) from None
    except Exception as exc:  # a header cut short: OSError, struct.error, ...; the upload's fault
        raise ImageError(
            400, "corrupt_image", f"the image is truncated or corrupt ({exc})"
        ) from None
    with image:
        if image.format not in ALLOWED_FORMATS:
            raise ImageError(
                415,
                "unsupported_format",
                f"{image.format} images are not accepted; send JPEG, PNG, WebP, BMP or GIF",
            )
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
            )
        try:
            image.load()
            return reduce_image(image, size)
        except Exception as exc:
            # Whatever Pillow raises on malformed bytes is the upload's fault, not the server's:
            # OSError and ValueError mostly, but a GIF cut inside a frame gives IndexError.
            raise ImageError(
                400,
                "corrupt_image",
                f"the {ALLOWED_FORMATS[image.format]} image is truncated or corrupt ({exc})",
            ) from None
