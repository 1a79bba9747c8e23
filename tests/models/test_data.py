"""Tests for models.data: IDX parsing, checksums, the download path, binarization.

Nothing here touches the network: downloads go through fake `fetch` functions, and
`urllib.request.urlopen` is replaced by a function that fails the test if it is ever called.
The real-data tests read MNIST from IWAE_DATA_DIR or ../shared/data/mnist and skip without it.
"""

from __future__ import annotations

import gzip
import hashlib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models import data
from models.data import (
    MNIST_FILES,
    MNIST_MIRRORS,
    TEST_BINARIZATION_SEED,
    DataError,
    Mnist,
    binarize_stochastic,
    binarized_test_images,
    load_mnist,
    read_idx,
)
from tests.support import mnist_files

IDX_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}
MIRROR_A = "https://mirror-a.invalid/mnist/"
MIRROR_B = "https://mirror-b.invalid/mnist"  # no trailing slash: load_mnist adds it


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode `array` as an IDX file: 00 00 <type> <ndim>, big-endian sizes, big-endian data."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_TYPE_CODES[big_endian.dtype], array.ndim])
    sizes = np.array(array.shape, dtype=">u4").tobytes()
    return header + sizes + big_endian.tobytes()


def md5(payload: bytes) -> str:
    return hashlib.md5(payload, usedforsecurity=False).hexdigest()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that reaches urllib's network code."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to open a URL: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def tiny_mnist(monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Four tiny MNIST-shaped arrays (5 train, 3 test images); MNIST_FILES holds their md5s."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([5, 0, 4, 1, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2, 1], dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, :2] = [0, 255]  # both ends of the grey scale
    checksums = {name: md5(idx_bytes(array)) for name, array in arrays.items()}
    monkeypatch.setattr(data, "MNIST_FILES", checksums)
    return arrays


def gz_server(
    files: dict[str, bytes], failing: tuple[str, ...] = (), calls: list[str] | None = None
) -> Callable[[str], bytes]:
    """A fake `fetch`: URLs under a mirror in `failing` raise OSError, others serve `files`."""

    def fetch(url: str) -> bytes:
        if calls is not None:
            calls.append(url)
        if url.startswith(failing):
            raise OSError("connection refused")
        name = url.rsplit("/", 1)[1]
        if name not in files:
            raise OSError("404 Not Found")
        return files[name]

    return fetch


def gz_files(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {f"{name}.gz": gzip.compress(idx_bytes(array)) for name, array in arrays.items()}


def assert_matches(mnist: Mnist, arrays: dict[str, np.ndarray]) -> None:
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        expected = torch.from_numpy(images.reshape(len(images), 784).astype(np.float32) / 255)
        assert torch.equal(getattr(mnist, f"{split}_images"), expected)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"].astype(np.int64))
        assert torch.equal(getattr(mnist, f"{split}_labels"), labels)


# --- read_idx ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (4, 28, 28)),
        (np.uint8, (7,)),
        (np.int8, (3, 5)),
        (np.int16, (2, 3, 4, 5)),
        (np.int32, (6,)),
        (np.float32, (2, 2)),
        (np.float64, (3,)),
    ],
)
def test_read_idx_round_trips(
    tmp_path: Path, compressed: bool, dtype: type, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype)
    payload = idx_bytes(array)
    path = tmp_path / ("file.gz" if compressed else "file")
    path.write_bytes(gzip.compress(payload) if compressed else payload)

    result = read_idx(path)

    assert result.shape == shape
    assert result.dtype == np.dtype(dtype)  # native byte order
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)
    result[...] = 0  # writable: a copy, not a view of the file's bytes


def test_read_idx_tells_gzip_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = tmp_path / "labels-idx2-ubyte"
    gz_named_raw.write_bytes(gzip.compress(idx_bytes(array)))
    raw_named_gz = tmp_path / "labels-idx2-ubyte.gz"
    raw_named_gz.write_bytes(idx_bytes(array))

    np.testing.assert_array_equal(read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gzip"])
def test_read_idx_refuses_truncated_payload(tmp_path: Path, compressed: bool) -> None:
    payload = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))[:-1]  # one byte short
    path = tmp_path / ("short.gz" if compressed else "short")
    path.write_bytes(gzip.compress(payload) if compressed else payload)

    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "7840" in str(info.value)  # the bytes the header promised


def test_read_idx_refuses_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "header-only"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([10, 28], dtype=">u4").tobytes())

    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")

    with pytest.raises(DataError, match="trailing bytes") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "bad magic"),
        (b"<html>404 Not Found</html>", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown data type"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00", "only 2 bytes"),
        (b"", "only 0 bytes"),
    ],
)
def test_read_idx_refuses_non_idx_content(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "not-idx"
    path.write_bytes(content)

    with pytest.raises(DataError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_corrupted_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    compressed = bytearray(gzip.compress(idx_bytes(rng.integers(0, 256, 5000, dtype=np.uint8))))
    compressed[len(compressed) // 2] ^= 0xFF  # flip one byte inside the deflate stream
    path = tmp_path / "corrupt.gz"
    path.write_bytes(bytes(compressed))

    with pytest.raises(DataError, match="corrupted gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_truncated_gzip(tmp_path: Path) -> None:
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])

    with pytest.raises(DataError, match="truncated or corrupted gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent-idx1-ubyte"
    with pytest.raises(DataError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- load_mnist from a folder -----------------------------------------------------------


def test_load_mnist_reads_gzip_and_raw_files(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    for i, (name, array) in enumerate(tiny_mnist.items()):
        if i % 2:
            (tmp_path / name).write_bytes(idx_bytes(array))
        else:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))

    mnist = load_mnist(tmp_path)

    assert mnist.train_images.shape == (5, 784)
    assert mnist.train_images.dtype == torch.float32
    assert mnist.train_labels.dtype == torch.int64
    assert mnist.train_images[0, :2].tolist() == [0.0, 1.0]
    assert_matches(mnist, tiny_mnist)


def test_load_mnist_refuses_checksum_mismatch(tmp_path: Path) -> None:
    # Well-formed IDX files of the right shapes, but not MNIST: the real checksums refuse them.
    fake = {
        "train-images-idx3-ubyte": np.zeros((2, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.zeros(2, dtype=np.uint8),
        "t10k-images-idx3-ubyte": np.zeros((1, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.zeros(1, dtype=np.uint8),
    }
    for name, array in fake.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))

    with pytest.raises(DataError, match="corrupted or not MNIST") as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert MNIST_FILES["train-images-idx3-ubyte"] in message
    assert md5(idx_bytes(fake["train-images-idx3-ubyte"])) in message


def test_load_mnist_refuses_mismatched_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, np.ndarray]
) -> None:
    tiny_mnist["t10k-labels-idx1-ubyte"] = np.array([1, 2], dtype=np.uint8)  # 3 images
    checksums = {name: md5(idx_bytes(array)) for name, array in tiny_mnist.items()}
    monkeypatch.setattr(data, "MNIST_FILES", checksums)
    for name, array in tiny_mnist.items():
        (tmp_path / name).write_bytes(idx_bytes(array))

    with pytest.raises(DataError, match="3 images, 2 labels"):
        load_mnist(tmp_path)


def test_load_mnist_without_download_dir_reports_missing_file(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        idx_bytes(tiny_mnist["train-images-idx3-ubyte"])
    )
    calls: list[str] = []

    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, fetch=gz_server(gz_files(tiny_mnist), calls=calls))
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path) in message
    assert "not downloaded" in message
    assert "IWAE_DATA_DIR" in message
    assert calls == []


# --- load_mnist downloads (fake fetch, no network) ----------------------------------------


def test_load_mnist_downloads_missing_files_from_the_next_mirror(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    data_dir, download_dir = tmp_path / "data", tmp_path / "downloads"
    data_dir.mkdir()
    served = gz_files(tiny_mnist)
    calls: list[str] = []

    mnist = load_mnist(
        data_dir,
        download_dir=download_dir,
        fetch=gz_server(served, failing=(MIRROR_A,), calls=calls),
        mirrors=(MIRROR_A, MIRROR_B),
    )

    assert_matches(mnist, tiny_mnist)
    assert calls == [
        url for name in tiny_mnist for url in (f"{MIRROR_A}{name}.gz", f"{MIRROR_B}/{name}.gz")
    ]
    assert sorted(p.name for p in download_dir.iterdir()) == sorted(served)  # no temp files
    for name, payload in served.items():
        assert (download_dir / name).read_bytes() == payload
    assert list(data_dir.iterdir()) == []

    # A second load finds the downloads and fetches nothing.
    calls.clear()
    again = load_mnist(
        data_dir,
        download_dir=download_dir,
        fetch=gz_server({}, failing=("",), calls=calls),
        mirrors=(MIRROR_A,),
    )
    assert_matches(again, tiny_mnist)
    assert calls == []


def test_load_mnist_downloads_only_what_is_missing(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(idx_bytes(tiny_mnist[name]))
    calls: list[str] = []

    mnist = load_mnist(
        tmp_path,
        download_dir=tmp_path,
        fetch=gz_server(gz_files(tiny_mnist), calls=calls),
        mirrors=(MIRROR_A,),
    )

    assert_matches(mnist, tiny_mnist)
    assert calls == [
        f"{MIRROR_A}train-labels-idx1-ubyte.gz",
        f"{MIRROR_A}t10k-images-idx3-ubyte.gz",
    ]


def test_load_mnist_skips_a_mirror_serving_bad_bytes(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    good = gz_files(tiny_mnist)
    bad = {name: gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x2a") for name in good}

    def fetch(url: str) -> bytes:
        name = url.rsplit("/", 1)[1]
        return (bad if url.startswith(MIRROR_A) else good)[name]

    mnist = load_mnist(
        tmp_path / "data", download_dir=tmp_path / "dl", fetch=fetch, mirrors=(MIRROR_A, MIRROR_B)
    )

    assert_matches(mnist, tiny_mnist)
    for name, payload in good.items():
        assert (tmp_path / "dl" / name).read_bytes() == payload


@pytest.mark.parametrize(
    "bad_payload",
    [
        gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x2a"),  # valid IDX, wrong checksum
        b"<html>Access Denied</html>",  # an error page served with status 200
        gzip.compress(b"x" * 1000)[:40],  # truncated download
    ],
    ids=["wrong-content", "html", "truncated"],
)
def test_load_mnist_refuses_a_bad_download(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray], bad_payload: bytes
) -> None:
    download_dir = tmp_path / "dl"

    with pytest.raises(DataError) as info:
        load_mnist(
            tmp_path / "data",
            download_dir=download_dir,
            fetch=lambda url: bad_payload,
            mirrors=(MIRROR_A,),
        )
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    assert f"{MIRROR_A}train-images-idx3-ubyte.gz" in message
    assert "could not download" in message
    assert not download_dir.exists() or list(download_dir.iterdir()) == []  # nothing kept


def test_load_mnist_reports_where_it_looked_when_all_mirrors_fail(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    data_dir, download_dir = tmp_path / "data", tmp_path / "dl"

    with pytest.raises(DataError) as info:
        load_mnist(
            data_dir,
            download_dir=download_dir,
            fetch=gz_server({}, failing=(MIRROR_A,)),
            mirrors=(MIRROR_A, MIRROR_B),
        )
    message = str(info.value)
    assert "MNIST file train-images-idx3-ubyte is missing" in message
    assert str(data_dir) in message
    assert str(download_dir) in message
    assert "could not download" in message
    assert f"{MIRROR_A}train-images-idx3-ubyte.gz: connection refused" in message
    assert f"{MIRROR_B}/train-images-idx3-ubyte.gz: 404 Not Found" in message
    assert "IWAE_DATA_DIR" in message


def test_load_mnist_does_not_replace_a_corrupted_local_file(
    tmp_path: Path, tiny_mnist: dict[str, np.ndarray]
) -> None:
    corrupted = tmp_path / "train-images-idx3-ubyte.gz"
    corrupted.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))))
    calls: list[str] = []

    with pytest.raises(DataError, match="corrupted or not MNIST") as info:
        load_mnist(
            tmp_path,
            download_dir=tmp_path,
            fetch=gz_server(gz_files(tiny_mnist), calls=calls),
            mirrors=(MIRROR_A,),
        )
    assert str(corrupted) in str(info.value)
    assert calls == []


def test_default_fetch_uses_urllib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_mnist: dict[str, np.ndarray]
) -> None:
    served = gz_files(tiny_mnist)
    opened: list[str] = []

    class Response:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def __enter__(self) -> Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self) -> bytes:
            return self.body

    def fake_urlopen(url: str, timeout: float) -> Response:
        opened.append(url)
        assert timeout > 0
        return Response(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)

    mnist = load_mnist(tmp_path / "data", download_dir=tmp_path / "dl")

    assert_matches(mnist, tiny_mnist)
    assert opened == [f"{MNIST_MIRRORS[0]}{name}.gz" for name in tiny_mnist]


def test_mnist_files_hold_the_published_checksums() -> None:
    assert dict(MNIST_FILES) == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


def test_mnist_refuses_mismatched_images_and_labels() -> None:
    with pytest.raises(ValueError, match="train images"):
        Mnist(torch.zeros(3, 784), torch.zeros(2), torch.zeros(1, 784), torch.zeros(1))


# --- binarization ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarize_draws_bernoulli_pixels(dtype: torch.dtype) -> None:
    images = torch.full((200, 784), 0.3, dtype=dtype)
    images[:, 0], images[:, 1] = 0.0, 1.0

    binary = binarize_stochastic(images, torch.Generator().manual_seed(0))

    assert binary.shape == images.shape
    assert binary.dtype == dtype
    assert binary.device == images.device
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert binary[:, 0].sum() == 0
    assert binary[:, 1].sum() == 200
    assert abs(binary[:, 2:].mean().item() - 0.3) < 0.01  # 156,400 draws: std 0.0012


def test_binarize_is_fresh_per_generator_and_repeatable_per_seed() -> None:
    images = torch.rand(50, 784, generator=torch.Generator().manual_seed(5))

    first = binarize_stochastic(images, torch.Generator().manual_seed(1))
    same = binarize_stochastic(images, torch.Generator().manual_seed(1))
    other = binarize_stochastic(images, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(1)
    epoch1, epoch2 = binarize_stochastic(images, generator), binarize_stochastic(images, generator)

    assert torch.equal(first, same)
    assert not torch.equal(first, other)
    assert not torch.equal(epoch1, epoch2)  # a new draw every call: dynamic binarization
    assert (first != other).float().mean() > 0.2


def test_binarized_test_images_is_fixed() -> None:
    images = torch.rand(100, 784, generator=torch.Generator().manual_seed(3))

    torch.manual_seed(0)
    first = binarized_test_images(images)
    torch.manual_seed(1)  # the global RNG plays no part
    second = binarized_test_images(images)
    explicit = binarized_test_images(images, seed=TEST_BINARIZATION_SEED)
    other_seed = binarized_test_images(images, seed=TEST_BINARIZATION_SEED + 1)

    assert torch.equal(first, second)
    assert torch.equal(first, explicit)
    assert not torch.equal(first, other_seed)
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert abs(first.mean().item() - images.mean().item()) < 0.01
    assert binarized_test_images(images.double()).dtype == torch.float64
    assert torch.equal(binarized_test_images(images.double()), first.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_binarized_test_images_is_the_same_on_cuda() -> None:
    images = torch.rand(100, 784, generator=torch.Generator().manual_seed(3))

    on_cuda = binarized_test_images(images.cuda())

    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), binarized_test_images(images))


# --- the real MNIST files -----------------------------------------------------------------


def test_real_mnist_shapes_and_values(real_mnist_data: Mnist) -> None:
    m = real_mnist_data
    assert m.train_images.shape == (60000, 784)
    assert m.test_images.shape == (10000, 784)
    assert m.train_labels.shape == (60000,)
    assert m.test_labels.shape == (10000,)
    assert m.train_images.dtype == m.test_images.dtype == torch.float32
    assert m.train_labels.dtype == m.test_labels.dtype == torch.int64
    for images in (m.train_images, m.test_images):
        assert images.min().item() == 0.0
        assert images.max().item() == 1.0
    assert abs(m.train_images.mean().item() - 0.1307) < 1e-4  # the well-known MNIST mean
    assert abs(m.train_images.std().item() - 0.3081) < 1e-4
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert m.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert m.train_labels.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949
    ]  # fmt: skip
    assert m.test_labels.bincount().tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]  # fmt: skip


def test_real_mnist_read_idx_agrees_with_load_mnist(real_mnist_data: Mnist) -> None:
    labels = read_idx(mnist_files()["t10k-labels-idx1-ubyte"])
    images = read_idx(mnist_files()["t10k-images-idx3-ubyte"])

    assert labels.dtype == images.dtype == np.uint8
    assert images.shape == (10000, 28, 28)
    assert torch.equal(real_mnist_data.test_labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(
        real_mnist_data.test_images[0], torch.from_numpy(images[0].ravel() / 255.0).float()
    )


def test_real_mnist_binarization(real_mnist_data: Mnist) -> None:
    x = real_mnist_data.test_images

    fixed = binarized_test_images(x)
    fixed_again = binarized_test_images(x.clone())
    draw0 = binarize_stochastic(x, torch.Generator().manual_seed(0))
    draw1 = binarize_stochastic(x, torch.Generator().manual_seed(1))

    assert torch.equal(fixed, fixed_again)
    assert set(fixed.unique().tolist()) == {0.0, 1.0}
    assert abs(fixed.mean().item() - x.mean().item()) < 1e-3  # 7.8M draws
    assert not torch.equal(draw0, draw1)
    assert not torch.equal(draw0, fixed)
    # Only the grey pixels (about 10% of all) differ between draws.
    assert 0.005 < (draw0 != draw1).float().mean().item() < 0.1
    assert torch.equal(fixed[x == 0], torch.zeros_like(x[x == 0]))
    assert torch.equal(fixed[x == 1], torch.ones_like(x[x == 1]))


def test_real_mnist_download_path(tmp_path: Path, real_mnist_data: Mnist) -> None:
    served = {}  # mirrors serve gzip: compress any raw file of the shared folder
    for name, path in mnist_files().items():
        body = path.read_bytes()
        served[f"{name}.gz"] = body if body.startswith(b"\x1f\x8b") else gzip.compress(body)
    calls: list[str] = []

    downloaded = load_mnist(
        tmp_path / "empty",
        download_dir=tmp_path / "dl",
        fetch=gz_server(served, failing=(MIRROR_A,), calls=calls),
        mirrors=(MIRROR_A, MIRROR_B),
    )

    assert len(calls) == 8  # every file: mirror A fails, mirror B serves it
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(downloaded, field), getattr(real_mnist_data, field))
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(served)
