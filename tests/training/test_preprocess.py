"""Preprocessing: a served image becomes exactly what the training loader made of it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import write_image
from training.data import load_image_folder
from training.preprocess import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    InputTransform,
    Preprocessing,
    load_image,
    reduce_image,
    to_rgb,
)


def _reference(path: Path) -> torch.Tensor:
    """Stage 1 by hand: to_rgb, then PIL's bilinear (antialiased) resize to 32x32."""
    with Image.open(path) as image:
        small = to_rgb(image).resize((32, 32), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(small)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tree whose train images are not 32x32: a 61x47 RGBA PNG and a photo-like JPEG."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (47, 61, 4), dtype=np.uint8)
    rgba_path = root / "train" / "a" / "rgba.png"
    rgba_path.parent.mkdir(parents=True)
    Image.fromarray(rgba, mode="RGBA").save(rgba_path)
    # Smooth gradients plus a little noise, the way a camera image looks, 150x100.
    y, x = np.mgrid[0:100, 0:150]
    photo = np.stack([x * 1.7, y * 2.5, (x + y) * 0.9], axis=-1) + rng.normal(0, 6, (100, 150, 3))
    photo_path = write_image(
        root / "train" / "b" / "photo.jpg", np.clip(photo, 0, 255).astype(np.uint8)
    )
    write_image(root / "test" / "a" / "t.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    write_image(root / "test" / "b" / "t.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return {"root": root, "rgba": rgba_path, "photo": photo_path}


def test_served_image_equals_the_training_loaders(odd_files: dict[str, Path]) -> None:
    train, _, classes = load_image_folder(odd_files["root"])
    assert classes == ["a", "b"]
    for index, name in enumerate(("rgba", "photo")):
        path = odd_files[name]
        served = load_image(path)
        assert served.shape == (3, 32, 32) and served.dtype == torch.uint8
        assert torch.equal(served, train.images[index]), name
        assert torch.equal(served, _reference(path)), name
        # From bytes (how the app receives an upload) it is the same again.
        assert torch.equal(load_image(io.BytesIO(path.read_bytes())), served), name


def test_reduction_is_antialiased_not_point_sampled() -> None:
    # A fine 1-pixel checkerboard at 128x128: point sampling would keep it black/white,
    # an antialiased reduction averages it to mid-gray.
    board = (np.indices((128, 128)).sum(axis=0) % 2 * 255).astype(np.uint8)
    reduced = reduce_image(Image.fromarray(board, mode="L"))
    assert reduced.shape == (3, 32, 32)
    assert (reduced.float() - 127.5).abs().max() < 10


def test_a_32x32_image_is_not_resampled(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = write_image(tmp_path / "x.png", array)
    assert np.array_equal(load_image(path).permute(1, 2, 0).numpy(), array)


def test_input_transform_matches_a_manual_computation() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = InputTransform()(images)
    assert out.shape == (3, 3, 227, 227) and out.dtype == torch.float32
    x = F.interpolate(images.float(), size=(227, 227), mode="bilinear", align_corners=False)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (x / 255 - mean) / std
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # channels_last only changes the layout; a lower dtype only the precision.
    nhwc = InputTransform()(images, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nhwc, out)
    bf16 = InputTransform()(images, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), out, rtol=1e-2, atol=2e-2)


def test_input_transform_skips_resize_at_input_size() -> None:
    images = torch.randint(0, 256, (1, 3, 227, 227), dtype=torch.uint8)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(InputTransform()(images), expected, rtol=0, atol=1e-5)


def test_preprocessing_round_trip_and_refusal() -> None:
    prep = Preprocessing()
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(ValueError, match="unsupported preprocessing"):
        Preprocessing.from_dict({**prep.to_dict(), "upscale": "bicubic"})


# ---- to_rgb: every mode becomes upright 8-bit RGB ---------------------------------------------


def _rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_to_rgb_grayscale() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = _rgb(Image.fromarray(gray, mode="L"))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], gray)


def test_to_rgb_palette_with_transparency_goes_onto_white() -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    image.info["transparency"] = 1  # blue is transparent
    out = _rgb(image)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]  # not blue: the background shows
    # Through a real PNG file as well.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=1)
    with Image.open(buffer) as reopened:
        assert reopened.mode == "P"
        assert np.array_equal(_rgb(reopened), out)


@pytest.mark.parametrize(
    ("mode", "clear", "ink"),
    [("RGB", (0, 0, 0), (200, 10, 10)), ("L", 0, 200), ("I;16", 0, 51400)],
    ids=["rgb", "grey", "16-bit-grey"],
)
def test_a_png_transparent_colour_goes_onto_white_as_alpha_does(
    mode: str, clear: Any, ink: Any
) -> None:
    """RGB, grey and 16-bit grey PNGs with a tRNS chunk (one colour transparent: how PNG
    optimisers store an RGBA image whose alpha is all or nothing) were kept as stored, black
    where the same picture as RGBA showed white."""
    image = Image.new(mode, (4, 4), ink)
    image.paste(clear, (0, 0, 4, 1))  # the top row: the transparent colour
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=clear)
    with Image.open(buffer) as reopened:
        assert reopened.info["transparency"] == clear
        out = _rgb(reopened)
    assert out[0].tolist() == [[255, 255, 255]] * 4  # the background shows
    assert out[1:].reshape(-1, 3).tolist() == [list(_rgb(Image.new(mode, (1, 1), ink))[0, 0])] * 12


def _png_16_bit_rgb(pixels: list[tuple[int, int, int]], transparent: tuple[int, int, int]) -> bytes:
    """A one-row 16-bit RGB PNG with a tRNS colour, which Pillow cannot write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + b"".join(struct.pack(">HHH", *p) for p in pixels)
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        chunk(b"IHDR", struct.pack(">IIBBBBB", len(pixels), 1, 16, 2, 0, 0, 0)),
        chunk(b"tRNS", struct.pack(">HHH", *transparent)),
        chunk(b"IDAT", zlib.compress(row)),
        chunk(b"IEND", b""),
    ])  # fmt: skip


def test_a_16_bit_rgb_pngs_transparent_colour_whitens_no_other_colour() -> None:
    """Pillow compares its 8-bit reduction of the pixels with the 16-bit colour's low bytes:
    applied, a pixel of another colour went white (and the transparent one did not)."""
    key = (0x1234, 0x5678, 0x9ABC)
    data = _png_16_bit_rgb([key, (0x3400, 0x7800, 0xBC00)], key)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB" and image.info["transparency"] == key
        out = _rgb(image)
    assert out[0].tolist() == [[0x12, 0x56, 0x9A], [0x34, 0x78, 0xBC]]  # as stored


def test_to_rgb_rgba_is_composited_onto_white() -> None:
    rgba = np.array(
        [[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128], [0, 200, 100, 64]]], dtype=np.uint8
    )
    out = _rgb(Image.fromarray(rgba, mode="RGBA")).astype(int)
    alpha = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(out - expected).max() <= 1
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent: white, not red


def test_to_rgb_cmyk() -> None:
    out = _rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert out[0, 0].tolist() == [255, 0, 0]
    out = _rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 255)))
    assert out[0, 0].tolist() == [0, 0, 0]


def test_to_rgb_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    expected = (values.astype(np.float64) * 255 / 65535).astype(int)  # 0, 3, 116, 255
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = _rgb(image)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out[0, 2, 0] < 200  # clipping would make every value above 255 white
    # A 16-bit PNG on disk (PIL opens it as I;16 or I).
    path = tmp_path / "deep.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert np.abs(_rgb(reopened)[..., 1].astype(int) - expected).max() <= 1


def test_to_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    # 16 wide, 8 high: left half red, right half blue. Orientation 6 = rotate 90 degrees
    # clockwise to display, so the upright image is 8 wide, 16 high, red on top.
    array = np.zeros((8, 16, 3), dtype=np.uint8)
    array[:, :8, 0] = 255
    array[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array, mode="RGB").save(path, exif=exif, quality=95)
    with Image.open(path) as image:
        assert image.size == (16, 8)
        out = _rgb(image)
    assert out.shape == (16, 8, 3)
    top, bottom = out[:8].reshape(-1, 3).mean(0), out[8:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    # And stage 1 sees it upright too: the top half of the 32x32 image is red.
    reduced = load_image(path)
    assert reduced[0, :16].float().mean() > 200 and reduced[2, :16].float().mean() < 60


def test_to_rgb_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as image:
        assert image.n_frames == 3
        assert _rgb(image)[0, 0].tolist() == [255, 0, 0]
    with Image.open(path) as image:
        image.seek(2)  # left on another frame (e.g. by a caller peeking at it)
        assert _rgb(image)[0, 0].tolist() == [255, 0, 0]
    assert load_image(path)[:, 0, 0].tolist() == [255, 0, 0]
