"""An upload for the model routes: a small hand-drawn '0' as PNG bytes."""

import io

from PIL import Image, ImageDraw


def digit_png() -> bytes:
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).ellipse((8, 4, 20, 24), outline=255, width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
