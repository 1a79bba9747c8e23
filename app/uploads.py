"""Uploaded images as route dependencies: the multipart file (and mask) decoded to MNIST
digits by `app.images`, within the settings' pixel limit (400/413/415 as `app.images` raises).

Routes that run a model declare the inference gate before these, so a refused request's
upload is never decoded.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import File, UploadFile

from app.deps import SettingsDep
from app.images import MaskedDigit, binarize, masked_digit, preprocess


def uploaded_digit(
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(description="An image of one digit: PNG, JPEG, GIF, BMP, TIFF or WebP; any size."),
    ],
) -> np.ndarray:
    """The upload as an MNIST digit, binarized at 0.5: `[784]` in {0, 1}."""
    return binarize(preprocess(file.file.read(), settings.max_image_pixels))


def uploaded_masked_digit(
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(
            description="An image of one digit, framed like MNIST (the digit fills about the "
            "middle 20/28 of a square frame); a PNG's transparent pixels are missing when no "
            "`mask` is sent."
        ),
    ],
    mask: Annotated[
        UploadFile | None,
        File(description="Same size as `file`: white (or transparent) pixels are missing."),
    ] = None,
) -> MaskedDigit:
    """The upload as a 28x28 binarized digit and its missing pixels."""
    mask_bytes = None if mask is None else mask.file.read()
    return masked_digit(file.file.read(), mask_bytes, settings.max_image_pixels)
