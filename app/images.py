"""Image codecs: uploaded pictures in, MNIST-style 28x28 digits out, and PNGs back.

`preprocess` turns an image in one of `FORMATS` into what the models were trained on, the way
MNIST itself was made (LeCun et al.): greyscale, light digit on a dark background, the
digit's bounding box scaled to fit 20x20 keeping its aspect ratio, then placed in a 28x28
field so that its centre of mass sits at the centre. Pure functions over bytes and numpy
arrays; the only state is `configure_pillow`, called once by the app's lifespan.
`masked_digit` prepares an incomplete digit and its mask for imputation, keeping the framing.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import (
    EmptyImage,
    ImageTooLarge,
    ImageTooThin,
    InvalidMask,
    NoDigitFound,
    UnreadableImage,
)

_Decoded = TypeVar("_Decoded")

SIDE = 28  # MNIST images are SIDE x SIDE
BOX = 20  # the digit's bounding box is scaled to fit BOX x BOX
# A pixel belongs to the digit when its contrast above the background is at least this
# fraction of the brightest pixel's.
INK_THRESHOLD = 0.2
# Below this contrast (on a 0..1 scale) between the brightest pixel and the background,
# the picture is blank.
MIN_CONTRAST = 0.1
# The only decoders Pillow may try on an upload: the formats people save drawings in. Not
# its ~40 others, some of which hand the bytes to other programs (EPS runs Ghostscript) or
# are rarely fuzzed (PCX, TGA, ICO, SPIDER, ...).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# Longest side over shortest side of an upload: past it the picture would be under one pixel
# across at 28x28, so it holds no digit; refusing it also keeps a thin picture from becoming
# a huge square anywhere (MAX_ASPECT x the pixel limit would otherwise be reachable).
MAX_ASPECT = SIDE


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow refuse decompression bombs itself, as a second line behind `decode`.

    Pillow only warns between MAX_IMAGE_PIXELS and twice that; the filter turns the warning
    into an error. Process-wide, so called once at startup rather than per request.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an image file into greyscale `[H, W] float32` in [0, 1] (1 = white).

    The header is checked against `max_pixels` and `MAX_ASPECT` before any pixel is
    decompressed, so a decompression bomb costs microseconds. Transparent pixels are
    composited on white (drawing apps export dark strokes on a transparent canvas); animated
    images give their first frame; EXIF orientation is applied.
    """
    return _decode(data, max_pixels, _to_grey)


def decode_with_transparency(data: bytes, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`decode`, and where the image is transparent (alpha below 50%): `[H, W] bool`, or
    None for an image without an alpha channel."""
    return _decode(data, max_pixels, lambda image: (_to_grey(image), _transparent(image)))


def _decode(data: bytes, max_pixels: int, convert: Callable[[Image.Image], _Decoded]) -> _Decoded:
    """Open `data` with the checks of `decode`, then `convert` the (first, upright) frame."""
    if not data:
        raise EmptyImage("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as exc:
        raise UnreadableImage(
            "the uploaded file is not an image this service reads (PNG, JPEG, GIF, BMP, "
            "TIFF or WebP)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise UnreadableImage("the image has no pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageTooThin(
            f"the image is {width}x{height} pixels: its longer side is more than {MAX_ASPECT} "
            "times its shorter one, so at 28x28 it would be less than a pixel across"
        )
    try:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        return convert(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt pixel data behind a valid header.
        raise UnreadableImage(f"the image could not be decoded: {exc}") from exc


def _to_grey(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> [H, W] float32 in [0, 1], transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            return (values / 65535.0).astype(np.float32)
        low, high = float(values.min()), float(values.max())
        scale = high - low if high > low else 1.0
        return ((values - low) / scale).astype(np.float32)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _transparent(image: Image.Image) -> np.ndarray | None:
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    return np.asarray(image.convert("RGBA"))[..., 3] < 128


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """Greyscale `[H, W]` in [0, 1] -> MNIST-style digit `[784] float32` in [0, 1].

    1. Light digit on dark ground: invert when the border (the outermost rows and
       columns) is mostly light, as when someone draws dark ink on white paper.
    2. Remove the background level (the border's median) and stretch the contrast so that
       the brightest pixel is 1; a picture with no contrast has no digit.
    3. Crop to the bounding box of the ink, scale it to fit 20x20 keeping its aspect ratio.
    4. Paste it into 28x28 so that its centre of mass lands on the centre pixel (14, 14),
       shifted back inside the field when the digit is very lopsided.
    """
    border = np.concatenate([grey[0], grey[-1], grey[1:-1, 0], grey[1:-1, -1]])
    if border.mean() > 0.5:
        grey = 1.0 - grey
        border = 1.0 - border
    background = float(np.median(border))
    contrast = float(grey.max()) - background
    if contrast < MIN_CONTRAST:
        raise NoDigitFound("no digit found: the image is blank or has too little contrast")
    ink = np.clip((grey - background) / contrast, 0.0, 1.0)
    rows = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink >= INK_THRESHOLD).any(axis=0))
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # [h, w]
    digit = _fit(box, BOX)  # [h', w'] with max(h', w') == BOX
    return _centre(digit, SIDE).reshape(SIDE * SIDE)


def _fit(
    box: np.ndarray, side: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> np.ndarray:
    """Resize `box` so that its longer side is `side`, keeping the aspect ratio."""
    height, width = box.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return box.astype(np.float32)
    resized = Image.fromarray(box.astype(np.float32)).resize(size, resample)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _centre(digit: np.ndarray, side: int) -> np.ndarray:
    """Paste `digit` [h, w] into a `side` x `side` field, centre of mass at (side/2, side/2)."""
    height, width = digit.shape
    mass = float(digit.sum())
    if mass <= 0.0:
        raise NoDigitFound("no digit found: the image is blank or has too little contrast")
    cy = float((digit.sum(axis=1) * np.arange(height)).sum()) / mass
    cx = float((digit.sum(axis=0) * np.arange(width)).sum()) / mass
    top = min(max(round(side / 2 - cy), 0), side - height)
    left = min(max(round(side / 2 - cx), 0), side - width)
    field = np.zeros((side, side), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def preprocess(data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image file -> MNIST-style digit `[784] float32` in [0, 1]."""
    return to_mnist(decode(data, max_pixels))


@dataclass(frozen=True)
class MaskedDigit:
    """An incomplete digit for imputation: `digit [784]` binarized, 0 where missing;
    `missing [784] bool`."""

    digit: np.ndarray
    missing: np.ndarray


def masked_digit(image: bytes, mask: bytes | None, max_pixels: int) -> MaskedDigit:
    """An image and its mask (white = missing, same size), or a PNG whose transparent pixels
    are missing, as a 28x28 incomplete digit.

    Unlike `preprocess`, the picture keeps its framing: it is scaled as a whole so that its
    longer side is 28, then padded to 28x28, because cropping to the digit and centring its
    mass would need the missing part. Light-on-dark is decided, and the contrast stretched,
    from observed pixels. Memory stays a few times the upload's pixels whatever its shape:
    it is shrunk before it is padded, never padded at full size.
    """
    if mask is None:
        grey, missing = decode_with_transparency(image, max_pixels)
        if missing is None:
            raise InvalidMask(
                "no mask: send the missing pixels as a second image `mask` (white = missing, "
                "same size), or send a PNG whose transparent pixels are the missing ones"
            )
    else:
        grey = decode(image, max_pixels)
        missing = decode(mask, max_pixels) >= 0.5
        if missing.shape != grey.shape:
            raise InvalidMask(
                f"the mask is {missing.shape[1]}x{missing.shape[0]} pixels but the image is "
                f"{grey.shape[1]}x{grey.shape[0]}: they must be the same size"
            )
    ink = _frame(_observed_ink(grey, missing), Image.Resampling.LANCZOS)
    missing = (_frame(missing.astype(np.float32), Image.Resampling.BOX) >= 0.5).reshape(SIDE * SIDE)
    if not missing.any():
        raise InvalidMask(
            "the mask marks no pixel as missing: missing pixels are white in `mask` (or "
            "transparent in a PNG sent alone), and at 28x28 a mark must cover half a pixel"
        )
    if missing.all():
        raise InvalidMask(
            "the mask marks every pixel as missing: nothing is left to condition on "
            "(GET /samples draws whole digits)"
        )
    digit = np.where(missing, 0.0, binarize(ink.reshape(SIDE * SIDE))).astype(np.float32)
    return MaskedDigit(digit=digit, missing=missing)


def _observed_ink(grey: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Light ink on a dark ground in [0, 1], decided from the observed pixels only (those
    on the border when there are any); 0 where missing and wherever the picture is blank."""
    edge = np.zeros(grey.shape, dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    seen = ~missing
    reference = grey[seen & edge] if (seen & edge).any() else grey[seen]
    if reference.size == 0:  # every pixel missing: refused by the caller after scaling
        return np.zeros_like(grey)
    if reference.mean() > 0.5:
        grey, reference = 1.0 - grey, 1.0 - reference
    background = float(np.median(reference))
    contrast = float(grey[seen].max()) - background
    if contrast < MIN_CONTRAST:
        return np.zeros_like(grey)
    return np.where(seen, np.clip((grey - background) / contrast, 0.0, 1.0), 0.0)


def _frame(values: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    """Scale `[H, W]` so that its longer side is `SIDE`, then pad it with zeros (dark ground,
    observed) to a centred `[SIDE, SIDE]`."""
    values = _fit(values, SIDE, resample)
    height, width = values.shape
    top, left = (SIDE - height) // 2, (SIDE - width) // 2
    field = np.zeros((SIDE, SIDE), dtype=np.float32)
    field[top : top + height, left : left + width] = values
    return field


def binarize(digit: np.ndarray) -> np.ndarray:
    """Threshold at 0.5, as the models were trained on binarized digits: [..., 784] in {0, 1}."""
    return (digit >= 0.5).astype(np.float32)


def encode_png(digit: np.ndarray) -> bytes:
    """One digit `[784]` (or `[28, 28]`) in [0, 1] -> an 8-bit greyscale 28x28 PNG."""
    return _png(np.asarray(digit, dtype=np.float32).reshape(SIDE, SIDE))


def encode_png_grid(digits: np.ndarray, padding: int = 2, cols: int | None = None) -> bytes:
    """n digits `[n, 784]` in [0, 1] -> one PNG, a grid with black padding.

    `cols` columns (default `ceil(sqrt(n))`, a near-square grid like torchvision's
    `make_grid`) and as many rows as needed.
    """
    digits = np.asarray(digits, dtype=np.float32).reshape(-1, SIDE, SIDE)  # [n, 28, 28]
    n = digits.shape[0]
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    cell = SIDE + padding
    grid = np.zeros((rows * cell + padding, cols * cell + padding), dtype=np.float32)
    for i, digit in enumerate(digits):
        top = padding + (i // cols) * cell
        left = padding + (i % cols) * cell
        grid[top : top + SIDE, left : left + SIDE] = digit
    return _png(grid)


def encode_imputation_strip(masked: MaskedDigit, single: np.ndarray, draws: np.ndarray) -> bytes:
    """One row of 28x28 cells: the input (missing pixels grey), the mask (white = missing),
    the single imputation, then each of the n draws: `single [784]`, `draws [n, 784]`."""
    shown = np.where(masked.missing, 0.5, masked.digit)
    cells = [shown, masked.missing.astype(np.float32), single, *draws]
    return encode_png_grid(np.stack(cells), cols=len(cells))


def _png(values: np.ndarray) -> bytes:
    pixels = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
