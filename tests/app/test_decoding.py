"""decode_upload: uploaded bytes -> the uint8 [3, 32, 32] tensor training used, or an ImageError
with the status and code the API answers."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import GifImagePlugin, Image

from app.decoding import ImageError, decode_upload
from tests.app import images
from training.preprocess import reduce_image

LIMIT = 1_000_000


def decode(data: bytes, max_pixels: int = LIMIT, size: int = 32) -> torch.Tensor:
    return decode_upload(data, max_pixels=max_pixels, size=size)


def refused(data: bytes, max_pixels: int = LIMIT) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, max_pixels)
    return info.value


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk (8-bit RGB) claiming this size, and where the pixel data
    would start, an IDAT chunk header with none of its data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    header = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + header + struct.pack(">I", 1 << 20) + b"IDAT"


def solid(color: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (20, 20)) -> Image:
    return Image.new(mode, size, color)


def test_decodes_to_the_training_resolution() -> None:
    data = images.png(0, (64, 48))
    out = decode(data)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    assert torch.equal(out, reduce_image(Image.open(io.BytesIO(data))))
    assert decode(data, size=16).shape == (3, 16, 16)


def test_a_32x32_rgb_image_is_taken_as_is() -> None:
    array = images.noise(1)
    out = decode(images.png(1))
    assert torch.equal(out, torch.from_numpy(array).permute(2, 0, 1))


def test_transparency_is_flattened_onto_white() -> None:
    out = decode(images.encode(solid((10, 200, 30, 0), "RGBA"), "PNG"))
    assert torch.all(out == 255)
    opaque = decode(images.encode(solid((10, 200, 30, 255), "RGBA"), "PNG"))
    assert opaque[:, 0, 0].tolist() == [10, 200, 30]


def test_grayscale_and_palette_become_rgb() -> None:
    gray = decode(images.encode(solid((77,), "L"), "PNG"))
    assert torch.all(gray == 77)
    palette = decode(images.encode(solid((250, 10, 10)).convert("P"), "PNG"))
    assert palette[0].float().mean() > 200 and palette[1:].float().mean() < 50


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    array = np.full((20, 20), 128 * 257, dtype=np.uint16)  # mid-gray on the 16-bit scale
    out = decode(images.encode(Image.fromarray(array), "PNG"))
    assert torch.all((out.int() - 128).abs() <= 1), out.unique()


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = solid((255, 0, 255, 0), "CMYK")  # cyan + yellow = green
    out = decode(images.encode(image, "JPEG", quality=95))
    expected = torch.tensor(image.convert("RGB").getpixel((0, 0)))
    assert out.shape == (3, 32, 32)
    assert (out[:, 5, 5].int() - expected).abs().max() <= 8, (out[:, 5, 5], expected)
    assert out[1, 5, 5] > 200 and out[0, 5, 5] < 60


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high: left red, right blue
    array[:, :32, 0] = 255
    array[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: red on top, blue below
    out = decode(images.encode(Image.fromarray(array), "JPEG", quality=95, exif=exif)).int()
    assert out[0, :12].float().mean() > 200 and out[2, :12].float().mean() < 60  # top: red
    assert out[2, -12:].float().mean() > 200 and out[0, -12:].float().mean() < 60  # bottom: blue


def test_an_image_with_exif_that_cannot_be_parsed_decodes_as_stored() -> None:
    """A PNG whose eXIf chunk is garbage opens and loads in Pillow, but reading its orientation
    raised SyntaxError: the upload was refused as undecodable (and the training loader named
    the file unreadable)."""
    data = images.encode(solid((255, 0, 0)), "PNG", exif=b"garbage!!")
    assert decode(data)[0].float().mean() > 200


def test_a_long_animation_is_not_walked_frame_by_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first frame is used: counting frames (n_frames) would decode every one of
    them, seconds for a GIF of many thousand small frames."""
    frames = [solid((255, 0, 0)).convert("P"), solid((0, 0, 255)).convert("P")]
    data = images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:])

    def counted(self: Image.Image) -> int:
        raise AssertionError("n_frames walked the animation")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(counted))
    assert decode(data)[0].float().mean() > 200  # the red first frame


def test_an_animated_gif_is_its_first_frame() -> None:
    frames = [solid((255, 0, 0)).convert("P"), solid((0, 0, 255)).convert("P")]
    data = images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode(data)
    assert out[0].float().mean() > 200 and out[2].float().mean() < 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_accepted_formats(fmt: str) -> None:
    assert decode(images.encode(Image.fromarray(images.noise(2)), fmt)).shape == (3, 32, 32)


def test_a_multi_picture_jpeg_is_a_jpeg() -> None:
    """Phone and camera JPEGs often carry a multi-picture segment; Pillow opens them as MPO."""
    first, second = Image.fromarray(images.noise(7)), solid((0, 0, 255), size=(32, 32))
    data = images.encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    assert data[:3] == b"\xff\xd8\xff"  # a JPEG file
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO" and image.n_frames == 2
    out = decode(data)
    as_jpeg = decode(images.encode(first, "JPEG", quality=95))
    assert out.shape == (3, 32, 32)
    assert (out.int() - as_jpeg.int()).abs().float().mean() < 3  # the first picture, not blue


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_other_formats_are_refused(fmt: str) -> None:
    error = refused(images.encode(Image.fromarray(images.noise(3)), fmt))
    assert (error.status, error.code) == (415, "unsupported_format")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def test_an_animated_gif_cut_short_is_corrupt_not_a_server_error() -> None:
    """Pillow raises IndexError for a GIF cut inside its second frame: still the upload's fault."""
    data = _animated_gif()
    assert (refused(data[:92]).status, refused(data[:92]).code) == (400, "corrupt_image")
    for cut in range(1, len(data)):  # every cut: an image (the first frame) or a 4xx, no other
        try:
            assert decode(data[:cut]).shape == (3, 32, 32)
        except ImageError as error:
            assert 400 <= error.status < 500, cut


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        pytest.param(b"", 400, "empty_file", id="empty"),
        pytest.param(b"hello, world\n" * 50, 415, "not_an_image", id="text"),
        pytest.param(b"\x00" * 1000, 415, "not_an_image", id="zeros"),
        pytest.param(images.jpeg(4, (96, 96))[:-400], 400, "corrupt_image", id="truncated-jpeg"),
        pytest.param(images.jpeg(4, (96, 96))[:20], 400, "corrupt_image", id="jpeg-header-cut"),
        pytest.param(images.png(5, (96, 96))[:30], 400, "corrupt_image", id="png-header-cut"),
        pytest.param(
            images.encode(Image.fromarray(images.noise(2)), "GIF")[:100],
            400,
            "corrupt_image",
            id="gif-palette-cut",
        ),
        pytest.param(images.png(5, (96, 96))[:-400], 400, "corrupt_image", id="truncated-png"),
        pytest.param(
            images.png(6, (96, 96))[:200] + b"\xff" * 400 + images.png(6, (96, 96))[600:],
            400,
            "corrupt_image",
            id="garbled-png",
        ),
    ],
)
def test_unusable_uploads(data: bytes, status: int, code: str) -> None:
    error = refused(data)
    assert (error.status, error.code) == (status, code)
    assert error.detail


def test_pixel_limit_is_checked_from_the_header() -> None:
    """A header alone (no pixel data at all) is enough to refuse an image that is too large: it
    is refused before anything is decoded."""
    error = refused(png_header(3000, 3000))
    assert (error.status, error.code) == (413, "too_many_pixels")
    assert "3000x3000" in error.detail
    # A real 3000x3000 image is refused the same way; one at the limit is decoded.
    assert refused(images.encode(Image.new("L", (3000, 3000)), "PNG")).code == "too_many_pixels"
    assert decode(images.encode(Image.new("L", (1000, 1000)), "PNG")).shape == (3, 32, 32)
    assert refused(images.encode(Image.new("L", (1000, 1001)), "PNG")).code == "too_many_pixels"


def test_a_decompression_bomb_is_refused_not_expanded() -> None:
    """Over PIL's own bomb limit, Image.open itself refuses; that is a 413 too."""
    error = refused(png_header(50_000, 50_000), max_pixels=10**12)
    assert (error.status, error.code) == (413, "too_many_pixels")
    assert "over 178,956,970 pixels" in error.detail  # Pillow's limit: what really refused it
