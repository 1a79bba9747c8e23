"""POST /impute and the mask parsing behind it (app.images.masked_digit)."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.cli import _config, build_parser, main
from app.errors import ImageTooThin, InvalidMask, UnreadableImage
from app.images import MAX_ASPECT, masked_digit, preprocess

MAX_PIXELS = 4_000_000


def png(values: np.ndarray, mode: str = "L") -> bytes:
    """An 8-bit PNG from values in [0, 1] ([H, W], or [H, W, 2] for greyscale + alpha)."""
    buffer = io.BytesIO()
    Image.fromarray(np.rint(values * 255).astype(np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


def mnist_like() -> np.ndarray:
    """A 28x28 light-on-dark digit: a thick vertical bar and a bar across the top."""
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[6:22, 12:16] = 1.0
    digit[6:9, 8:20] = 0.8
    return digit


def top_half_mask(height: int = 28, width: int = 28) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.float32)
    mask[: height // 2] = 1.0
    return mask


# --- parsing ------------------------------------------------------------------------------


def test_a_28x28_digit_and_mask_are_taken_pixel_for_pixel() -> None:
    digit = mnist_like()

    masked = masked_digit(png(digit), png(top_half_mask()), MAX_PIXELS)

    expected_missing = top_half_mask().astype(bool).reshape(784)
    assert np.array_equal(masked.missing, expected_missing)
    binary = (digit.reshape(784) >= 0.5).astype(np.float32)
    assert np.array_equal(masked.digit, np.where(expected_missing, 0.0, binary))


def test_a_large_dark_on_light_drawing_is_scaled_as_a_whole() -> None:
    """280x280, dark ink on white: inverted, scaled 10x down; the white top half is missing."""
    drawing = 1.0 - np.kron(mnist_like(), np.ones((10, 10)))  # [280, 280]

    masked = masked_digit(png(drawing), png(top_half_mask(280, 280)), MAX_PIXELS)

    assert np.array_equal(masked.missing, top_half_mask().astype(bool).reshape(784))
    lower = masked.digit.reshape(28, 28)[14:]
    assert np.array_equal(lower, (mnist_like()[14:] >= 0.5).astype(np.float32))


def test_transparent_pixels_are_missing_when_no_mask_is_sent() -> None:
    grey = 1.0 - np.kron(mnist_like(), np.ones((4, 4)))  # [112, 112], dark on light
    alpha = 1.0 - top_half_mask(112, 112)  # top half transparent
    rgba = np.stack([grey, alpha], axis=-1)

    masked = masked_digit(png(rgba, mode="LA"), None, MAX_PIXELS)

    assert np.array_equal(masked.missing, top_half_mask().astype(bool).reshape(784))
    assert masked.digit.reshape(28, 28)[14:].sum() == (mnist_like()[14:] >= 0.5).sum()


def test_a_wide_picture_is_padded_to_a_square() -> None:
    """28x14 (wide): padded with background to 28x28, the picture in rows 7 to 20."""
    digit = mnist_like()[7:21]  # [14, 28]
    mask = np.zeros((14, 28), dtype=np.float32)
    mask[:, :10] = 1.0

    masked = masked_digit(png(digit), png(mask), MAX_PIXELS)

    missing = masked.missing.reshape(28, 28)
    assert missing[7:21, :10].all() and missing.sum() == 14 * 10


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (png(np.ones((20, 28))), "the mask is 28x20 pixels but the image is 28x28"),
        (png(np.zeros((28, 28))), "marks no pixel as missing"),
        (png(np.ones((28, 28))), "marks every pixel as missing"),
        (None, "no mask"),
    ],
)
def test_bad_masks_are_refused_with_a_plain_message(mask: bytes | None, message: str) -> None:
    with pytest.raises(InvalidMask, match=message):
        masked_digit(png(mnist_like()), mask, MAX_PIXELS)


def test_a_mark_smaller_than_half_a_pixel_at_28x28_is_no_mask() -> None:
    mask = np.zeros((280, 280), dtype=np.float32)
    mask[100:104, 100:104] = 1.0  # 4x4 of 280x280: 0.16 of one 28x28 pixel

    with pytest.raises(InvalidMask, match="half a pixel"):
        masked_digit(png(np.kron(mnist_like(), np.ones((10, 10)))), png(mask), MAX_PIXELS)


def digit_and_mask(height: int, width: int) -> tuple[bytes, bytes]:
    """A bar of ink in the middle of a `width` x `height` picture; the first two thirds of
    its longer side missing."""
    digit = np.zeros((height, width), dtype=np.float32)
    digit[height // 4 : 3 * height // 4, width // 3 : width // 2] = 1.0
    mask = np.zeros((height, width), dtype=np.float32)
    if width >= height:
        mask[:, : 2 * width // 3] = 1.0
    else:
        mask[: 2 * height // 3] = 1.0
    return png(digit), png(mask)


def traced_peak(parse: Callable[[], object]) -> int:
    """Most bytes Python and numpy held at once while `parse()` ran (tracemalloc)."""
    tracemalloc.start()
    try:
        parse()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Arrays of an upload's size held at once while it is parsed, at 4 bytes (float32) a pixel.
BYTES_PER_PIXEL = 32


@pytest.mark.parametrize(("height", "width"), [(1058, 1058), (200, 200 * MAX_ASPECT), (5600, 200)])
def test_parsing_memory_is_bounded_by_pixels_whatever_the_shape(height: int, width: int) -> None:
    """A thin picture at the aspect-ratio limit costs what a square one of as many pixels
    does: it is shrunk before it is padded (padded first, 5600x200 held 3 x 5600^2 floats)."""
    image, mask = digit_and_mask(height, width)

    for parse in (
        lambda: masked_digit(image, mask, MAX_PIXELS),
        lambda: preprocess(image, MAX_PIXELS),
    ):
        assert traced_peak(parse) <= BYTES_PER_PIXEL * height * width


def test_a_picture_thinner_than_the_aspect_limit_is_refused() -> None:
    image, mask = digit_and_mask(50, 20_000)

    with pytest.raises(ImageTooThin, match="20000x50 pixels"):
        masked_digit(image, mask, MAX_PIXELS)


def test_a_mask_that_is_not_an_image_is_unreadable() -> None:
    with pytest.raises(UnreadableImage):
        masked_digit(png(mnist_like()), b"not an image", MAX_PIXELS)


# --- the route ------------------------------------------------------------------------------


def files(image: bytes, mask: bytes | None = None) -> dict:
    sent = {"file": ("digit.png", image, "image/png")}
    if mask is not None:
        sent["mask"] = ("mask.png", mask, "image/png")
    return sent


def test_impute_answers_a_png_strip(client: TestClient, tiny_model: str) -> None:
    response = client.post(
        "/impute", params={"n": 5, "k": 50}, files=files(png(mnist_like()), png(top_half_mask()))
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    strip = Image.open(io.BytesIO(response.content))
    # input, mask, single, 5 draws: 8 cells of 28 pixels with 2 pixels of padding.
    assert strip.size == (8 * 30 + 2, 32)


def test_impute_json_keeps_observed_pixels_and_is_seeded(
    client: TestClient, tiny_model: str
) -> None:
    sent = files(png(mnist_like()), png(top_half_mask()))
    params = {"n": 3, "k": 100, "seed": 7, "format": "json"}

    body = client.post("/impute", params=params, files=sent).json()
    again = client.post("/impute", params=params, files=sent).json()

    assert body == again
    assert (body["model_id"], body["k"]) == (tiny_model, 100)
    missing = np.array(body["missing"], dtype=bool)
    assert missing.sum() == 392 and missing[:392].all()
    given = np.array(body["input"])
    single, draws = np.array(body["single"]), np.array(body["draws"])
    assert draws.shape == (3, 784)
    assert np.array_equal(single[~missing], given[~missing])
    assert np.array_equal(draws[:, ~missing], np.broadcast_to(given[~missing], (3, 392)))
    assert ((single >= 0) & (single <= 1)).all() and set(np.unique(draws)) <= {0.0, 1.0}
    assert body["observed_log_likelihood"] < 0


def test_impute_takes_a_transparent_png_alone(client: TestClient, tiny_model: str) -> None:
    rgba = np.stack([mnist_like(), 1.0 - top_half_mask()], axis=-1)

    response = client.post(
        "/impute", params={"format": "json", "n": 0}, files=files(png(rgba, "LA"))
    )

    assert response.status_code == 200
    assert sum(response.json()["missing"]) == 392 and response.json()["draws"] == []


@pytest.mark.parametrize(
    ("image", "mask", "status", "detail"),
    [
        (png(mnist_like()), png(np.ones((27, 28))), 400, "must be the same size"),
        (png(mnist_like()), png(np.zeros((28, 28))), 400, "no pixel as missing"),
        (png(mnist_like()), png(np.ones((28, 28))), 400, "every pixel as missing"),
        (png(mnist_like()), None, 400, "no mask"),
        (b"%PDF-1.4 not an image", png(top_half_mask()), 415, "not an image"),
        (png(mnist_like()), b"GIF89a broken", 415, "not an image"),
        (*digit_and_mask(50, 20_000), 422, "more than 28 times its shorter one"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_plain_message(
    client: TestClient,
    tiny_model: str,
    image: bytes,
    mask: bytes | None,
    status: int,
    detail: str,
) -> None:
    response = client.post("/impute", files=files(image, mask))

    assert response.status_code == status
    assert detail in response.json()["detail"]


def test_k_and_n_limits(make_client: Callable[..., TestClient], tiny_model: str) -> None:
    client = make_client(max_impute_k=20)
    sent = files(png(mnist_like()), png(top_half_mask()))

    assert client.post("/impute", params={"k": 21}, files=sent).status_code == 422
    assert client.post("/impute", params={"n": 65}, files=sent).status_code == 422
    assert client.post("/impute", params={"k": 20, "n": 64}, files=sent).status_code == 200
    # Without k the default (1000) is lowered to the limit.
    assert client.post("/impute", params={"format": "json"}, files=sent).json()["k"] == 20


def test_impute_without_a_model_is_409(client: TestClient) -> None:
    response = client.post("/impute", files=files(png(mnist_like()), png(top_half_mask())))

    assert response.status_code == 409


# --- training on incomplete images through the API ---------------------------------------------


def test_train_accepts_the_missing_data_options(client: TestClient) -> None:
    body = {"k": 5, "missing_rate": 0.5, "missing_pattern": "random-square"}

    response = client.post("/train", json=body)

    assert response.status_code == 202
    config = response.json()["config"]
    assert (config["missing_rate"], config["missing_pattern"]) == (0.5, "random-square")
    assert client.post("/train", json={"k": 5}).json()["config"]["missing_rate"] == 0.0


@pytest.mark.parametrize(
    "body", [{"k": 5, "missing_rate": 0.95}, {"k": 5, "missing_pattern": "bottom-half"}]
)
def test_train_refuses_bad_missing_data_options(client: TestClient, body: dict) -> None:
    assert client.post("/train", json=body).status_code == 422


# --- iwae impute ---------------------------------------------------------------------------------


def test_the_cli_writes_the_same_strip_as_the_api(
    client: TestClient, tiny_model: str, home: Path, tmp_path: Path, capsys
) -> None:
    image, mask = tmp_path / "digit.png", tmp_path / "mask.png"
    image.write_bytes(png(mnist_like()))
    mask.write_bytes(png(top_half_mask()))
    out = tmp_path / "strip.png"
    model = home / "models" / tiny_model
    options = ["--k", "30", "--n", "4", "--seed", "3"]

    code = main(
        [
            "impute",
            "--model",
            str(model),
            str(image),
            "--mask",
            str(mask),
            "--out",
            str(out),
            *options,
        ]
    )

    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["out"], summary["k"], summary["n"]) == (str(out), 30, 4)
    assert summary["missing_pixels"] == 392 and summary["observed_log_likelihood"] < 0
    served = client.post(
        "/impute",
        params={"k": 30, "n": 4, "seed": 3},
        files=files(image.read_bytes(), mask.read_bytes()),
    )
    assert out.read_bytes() == served.content


def test_the_cli_says_what_is_wrong_with_a_mask(
    tiny_model: str, home: Path, tmp_path: Path, capsys
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(png(mnist_like()))

    code = main(["impute", "--model", str(home / "models" / tiny_model), str(image)])

    assert code == 2
    assert "iwae impute: error: no mask" in capsys.readouterr().err


def test_the_cli_trains_on_incomplete_images_when_asked() -> None:
    args = build_parser().parse_args(
        ["train", "--k", "5", "--missing-rate", "0.5", "--missing-pattern", "top-half"]
    )

    config = _config(args, args.k)

    assert (config.missing_rate, config.missing_pattern) == (0.5, "top-half")
