"""app.images: uploads in any format become MNIST-style digits; PNG encoding of outputs."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from app import images
from app.errors import EmptyImage, ImageTooLarge, NoDigitFound, UnreadableImage

MAX_PIXELS = 4_000_000


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def light_on_dark(size: tuple[int, int] = (200, 200), box=(40, 30, 110, 170)) -> Image.Image:
    """A '0': a thick white ellipse on black, like an MNIST digit before downscaling."""
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).ellipse(box, outline=255, width=14)
    return image


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    grid = digit.reshape(28, 28)
    rows, cols = np.mgrid[:28, :28]
    return float((grid * rows).sum() / grid.sum()), float((grid * cols).sum() / grid.sum())


@pytest.fixture
def reference() -> np.ndarray:
    return images.preprocess(encode(light_on_dark()), MAX_PIXELS)


def test_output_is_784_values_in_unit_interval(reference: np.ndarray) -> None:
    assert reference.shape == (784,)
    assert reference.dtype == np.float32
    assert reference.min() >= 0.0 and reference.max() <= 1.0
    assert reference.max() == pytest.approx(1.0, abs=0.05)


def test_dark_on_light_gives_the_same_digit_as_light_on_dark(reference: np.ndarray) -> None:
    inverted = Image.eval(light_on_dark(), lambda v: 255 - v)
    digit = images.preprocess(encode(inverted), MAX_PIXELS)
    np.testing.assert_allclose(digit, reference, atol=1e-5)


def test_digit_box_is_scaled_to_fit_20x20_keeping_aspect_ratio(reference: np.ndarray) -> None:
    grid = reference.reshape(28, 28) > 0.05
    rows = np.flatnonzero(grid.any(axis=1))
    cols = np.flatnonzero(grid.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert height == 20  # the ellipse is taller than wide: its height fills the 20 pixels
    assert width == pytest.approx(20 * 70 / 140, abs=1.5)


def test_off_centre_digit_is_recentred_by_centre_of_mass() -> None:
    corner = light_on_dark(size=(400, 300), box=(300, 200, 380, 290))
    digit = images.preprocess(encode(corner), MAX_PIXELS)
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 1.0 and abs(col - 14) <= 1.0


def test_lopsided_digit_is_centred_by_mass_not_by_box() -> None:
    image = Image.new("L", (100, 100), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 10, 70, 65), fill=255)  # a heavy block on top
    draw.line((50, 65, 50, 90), fill=255, width=4)  # a thin stem below
    digit = images.preprocess(encode(image), MAX_PIXELS)
    row, _ = centre_of_mass(digit)
    assert abs(row - 14) <= 0.5
    top = np.flatnonzero(digit.reshape(28, 28).any(axis=1))[0]
    assert top > 4  # centring the 20-pixel box itself would have put its top at row 4


def test_very_lopsided_digit_stays_inside_the_field() -> None:
    image = Image.new("L", (100, 100), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 90, 20), fill=255)  # nearly all the mass at the very top
    draw.line((50, 20, 50, 90), fill=255, width=3)
    digit = images.preprocess(encode(image), MAX_PIXELS).reshape(28, 28)
    rows = np.flatnonzero(digit.any(axis=1))
    assert rows[0] == 8 and rows[-1] == 27  # shifted as far as it goes, nothing cut off


def test_gif_uses_its_first_frame(reference: np.ndarray) -> None:
    first = Image.eval(light_on_dark(), lambda v: 255 - v).convert("P")
    other = Image.new("P", first.size, 0)
    data = encode(first, "GIF", save_all=True, append_images=[other])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_allclose(images.preprocess(data, MAX_PIXELS), reference, atol=1e-5)


def test_transparent_canvas_is_composited_on_white(reference: np.ndarray) -> None:
    """Drawing apps export dark strokes on a transparent background (RGBA)."""
    mask = light_on_dark()
    rgba = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", mask.size, (0, 0, 0, 255)), mask=mask)
    np.testing.assert_allclose(images.preprocess(encode(rgba), MAX_PIXELS), reference, atol=1e-5)


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF"])
def test_lossless_formats_agree_with_png(fmt: str, reference: np.ndarray) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    digit = images.preprocess(encode(light_on_dark(), fmt, **options), MAX_PIXELS)
    np.testing.assert_allclose(digit, reference, atol=0.02)


def test_jpeg_of_a_colour_photo_is_read(reference: np.ndarray) -> None:
    photo = Image.merge("RGB", [Image.eval(light_on_dark(), lambda v: 255 - v)] * 3)
    digit = images.preprocess(encode(photo, "JPEG", quality=90), MAX_PIXELS)
    assert digit.shape == (784,)
    # JPEG ringing can move the box edge by a pixel; the binarized digits mostly agree.
    agree = (images.binarize(digit) == images.binarize(reference)).mean()
    assert agree > 0.95


def test_sixteen_bit_greyscale_is_read(reference: np.ndarray) -> None:
    wide = (np.asarray(light_on_dark(), dtype=np.uint16) * 257).astype(np.uint16)
    data = encode(Image.fromarray(wide))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_allclose(images.preprocess(data, MAX_PIXELS), reference, atol=1e-3)


@pytest.mark.parametrize("colour", [0, 255, 128])
def test_blank_images_have_no_digit(colour: int) -> None:
    with pytest.raises(NoDigitFound, match="no digit found"):
        images.preprocess(encode(Image.new("L", (64, 64), colour)), MAX_PIXELS)


def test_empty_file_is_refused() -> None:
    with pytest.raises(EmptyImage):
        images.preprocess(b"", MAX_PIXELS)


@pytest.mark.parametrize("data", [b"hello, world", b"%PDF-1.4\n", b"\x89PNG\r\n\x1a\n"])
def test_non_images_are_refused(data: bytes) -> None:
    with pytest.raises(UnreadableImage, match="not an image"):
        images.preprocess(data, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "PCX", "TGA", "ICO", "SGI", "IM"])
def test_formats_outside_the_allowlist_are_refused(fmt: str) -> None:
    data = encode(light_on_dark(), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt, "Pillow itself would read it"
    with pytest.raises(UnreadableImage, match="not an image this service reads"):
        images.preprocess(data, MAX_PIXELS)


def test_the_eps_decoder_is_never_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading EPS runs Ghostscript where it is installed: not even its header is parsed."""
    from PIL import EpsImagePlugin

    tried = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: tried.append(self))
    with pytest.raises(UnreadableImage):
        images.preprocess(encode(light_on_dark(), "EPS"), MAX_PIXELS)
    assert tried == []


def test_truncated_image_is_refused() -> None:
    data = encode(light_on_dark())
    with pytest.raises(UnreadableImage):
        images.preprocess(data[: len(data) // 2], MAX_PIXELS)


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("1", (1, 1))))
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[8:33] = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


@pytest.mark.parametrize("side", [2001, 50_000])
def test_decompression_bomb_is_refused_from_its_header(side: int) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="pixels"):
        images.preprocess(png_header_claiming(side, side), MAX_PIXELS)
    assert time.perf_counter() - start < 0.5


def test_pillow_itself_refuses_bombs_once_configured() -> None:
    images.configure_pillow(MAX_PIXELS)
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        Image.open(io.BytesIO(png_header_claiming(2100, 2100)))


def test_binarize_thresholds_at_one_half() -> None:
    values = np.array([0.0, 0.49, 0.5, 0.51, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(images.binarize(values), [0, 0, 1, 1, 1])


def test_png_round_trip() -> None:
    digit = np.linspace(0, 1, 784, dtype=np.float32)
    decoded = Image.open(io.BytesIO(images.encode_png(digit)))
    assert decoded.size == (28, 28) and decoded.mode == "L"
    np.testing.assert_allclose(np.asarray(decoded).reshape(784) / 255, digit, atol=1 / 255)


@pytest.mark.parametrize(("n", "cols", "rows"), [(1, 1, 1), (5, 3, 2), (16, 4, 4), (17, 5, 4)])
def test_png_grid_is_near_square(n: int, cols: int, rows: int) -> None:
    grid = Image.open(io.BytesIO(images.encode_png_grid(np.ones((n, 784), np.float32))))
    assert grid.size == (cols * 30 + 2, rows * 30 + 2)
    assert np.asarray(grid).sum() == n * 784 * 255
