"""MNIST: reading IDX files, verifying and downloading them, and binarizing images.

`load_mnist` reads the four standard IDX files (gzip or raw) from a folder, checks the md5 of
their decompressed bytes against the published MNIST values and, only when asked to (a
`download_dir`), fetches missing files from public mirrors. Images come back as
`[N, D]` float32 grey levels in [0, 1] (D = 784); the models see Bernoulli draws of them:
`binarize_stochastic` gives a fresh draw each call (dynamic binarization, for training) and
`binarized_test_images` one fixed draw so that evaluations are comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from models.files import write_atomic

# Decompressed md5 of each standard MNIST file (the published values, see
# ../shared/data/mnist/README.md). The .gz wrappers differ between mirrors; their contents do not.
MNIST_FILES: Mapping[str, str] = MappingProxyType(
    {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
)

# Public mirrors serving `<name>.gz`, tried in order.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# Seed of the one fixed binarization of the test set that every evaluation uses.
TEST_BINARIZATION_SEED = 20151101

IMAGE_SIDE = 28

Fetch = Callable[[str], bytes]
"""Downloads one URL and returns its body; raises `OSError` (or `http.client.HTTPException`)."""

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes (third magic byte); multi-byte values are big-endian.
_IDX_DTYPES: Mapping[int, np.dtype] = MappingProxyType(
    {
        0x08: np.dtype(np.uint8),
        0x09: np.dtype(np.int8),
        0x0B: np.dtype(">i2"),
        0x0C: np.dtype(">i4"),
        0x0D: np.dtype(">f4"),
        0x0E: np.dtype(">f8"),
    }
)
_DOWNLOAD_TIMEOUT_S = 60.0


class DataError(Exception):
    """A data file is missing, truncated, corrupted or not what it claims to be.

    The message names the file and says what is wrong with it.
    """


@dataclass(frozen=True)
class Mnist:
    """The MNIST split as tensors on the CPU.

    train_images: [60000, D] float32 in [0, 1], D = 784 (rows of the 28x28 image).
    train_labels: [60000] int64 in 0..9.
    test_images: [10000, D] float32 in [0, 1].
    test_labels: [10000] int64 in 0..9.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{split} images must be [N, D] and labels [N], got "
                    f"{tuple(images.shape)} and {tuple(labels.shape)}"
                )


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw (told apart by magic bytes, not by name).

    Returns a native-endian, writable array with the shape and dtype the header declares,
    e.g. [N, 28, 28] uint8 for images and [N] uint8 for labels.
    Raises `DataError` naming the file if it cannot be read, is not gzip-decodable, or its
    header (magic, type code, dimensions) does not match its payload.
    """
    path = Path(path)
    return _parse_idx(_decompress(_read_bytes(path), path), path)


def load_mnist(
    data_dir: Path,
    *,
    download_dir: Path | None = None,
    fetch: Fetch | None = None,
    mirrors: Sequence[str] = MNIST_MIRRORS,
) -> Mnist:
    """Load the four MNIST files from `data_dir`, downloading missing ones if allowed.

    Each file is looked for as `<name>.gz`, then `<name>`, in `data_dir` and then in
    `download_dir` (where earlier downloads went). A file found nowhere is downloaded, only
    when `download_dir` is given, as `<name>.gz` from each of `mirrors` in turn with `fetch`
    (urllib by default), checked, and written atomically into `download_dir`.
    Every file's decompressed md5 must match `MNIST_FILES`; nothing is memoized.
    Raises `DataError` naming the file on any missing, corrupted or undownloadable file.
    """
    data_dir = Path(data_dir)
    download_dir = None if download_dir is None else Path(download_dir)
    search_dirs = [data_dir]
    if download_dir is not None and download_dir != data_dir:
        search_dirs.append(download_dir)

    arrays: dict[str, np.ndarray] = {}
    for name, md5 in MNIST_FILES.items():
        found = _find_file(name, search_dirs)
        if found is not None:
            data = _decompress(_read_bytes(found), found)
            _check_md5(data, md5, found)
        elif download_dir is not None:
            found, data = _download(
                name, md5, search_dirs, download_dir, fetch or _urllib_fetch, mirrors
            )
        else:
            raise DataError(
                f"MNIST file {name} is missing: looked for {name}.gz and {name} in {data_dir}, "
                "and no download folder was given, so it was not downloaded. Put the four "
                "MNIST files there (IWAE_DATA_DIR points the service at such a folder)."
            )
        arrays[name] = _parse_idx(data, found)

    train_images, train_labels = _split(arrays, "train")
    test_images, test_labels = _split(arrays, "t10k")
    return Mnist(train_images, train_labels, test_images, test_labels)


def binarize_stochastic(images: Tensor, generator: torch.Generator) -> Tensor:
    """A fresh Bernoulli draw of each pixel: dynamic binarization.

    images: [..., D] probabilities in [0, 1]. generator: on the same device as `images`.
    Returns [..., D] of 0s and 1s, same dtype and device as `images`.
    """
    return torch.bernoulli(images, generator=generator)


def binarized_test_images(images: Tensor, seed: int = TEST_BINARIZATION_SEED) -> Tensor:
    """The one fixed binarization of `images` that evaluations share.

    The uniforms come from a CPU generator seeded with `seed` and are moved to the device of
    `images`, so the result is the same on any device and does not touch the global RNG.
    images: [N, D] probabilities in [0, 1]. Returns [N, D] 0s and 1s, same dtype and device.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    uniforms = torch.rand(images.shape, generator=generator, dtype=torch.float32)  # [N, D]
    return (uniforms.to(images.device) < images).to(images.dtype)


def _split(arrays: Mapping[str, np.ndarray], prefix: str) -> tuple[Tensor, Tensor]:
    """Images [N, 28, 28] uint8 and labels [N] uint8 -> [N, D] float32 in [0, 1], [N] int64."""
    images = arrays[f"{prefix}-images-idx3-ubyte"]
    labels = arrays[f"{prefix}-labels-idx1-ubyte"]
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or labels.ndim != 1:
        raise DataError(
            f"{prefix} MNIST files have shapes {images.shape} and {labels.shape}, "
            f"expected [N, {IMAGE_SIDE}, {IMAGE_SIDE}] and [N]"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{prefix} MNIST files disagree: {images.shape[0]} images, {labels.shape[0]} labels"
        )
    flat = images.reshape(images.shape[0], -1).astype(np.float32)  # [N, D]
    flat /= 255.0
    return torch.from_numpy(flat), torch.from_numpy(labels.astype(np.int64))


def _find_file(name: str, dirs: Sequence[Path]) -> Path | None:
    for directory in dirs:
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _decompress(raw: bytes, path: Path | str) -> bytes:
    """Gunzip `raw` if it starts with the gzip magic bytes; otherwise return it unchanged."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is a truncated or corrupted gzip file: {err}") from err


def _parse_idx(data: bytes, path: Path | str) -> np.ndarray:
    """Decode decompressed IDX bytes: magic 00 00 <type> <ndim>, ndim big-endian uint32 sizes."""
    if len(data) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(data)} bytes")
    if data[0:2] != b"\x00\x00":
        raise DataError(f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()}")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file: unknown data type code 0x{type_code:02x}")
    if ndim == 0:
        raise DataError(f"{path} is not an IDX file: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: its header declares {ndim} dimensions "
            f"({header} header bytes) but the file has {len(data)} bytes"
        )
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header
    if payload != expected:
        problem = "is truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{path} {problem}: header declares shape {shape} of {dtype.name} "
            f"({expected} bytes of data) but the file holds {payload}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # copy: native byte order, writable


def _check_md5(data: bytes, md5: str, path: Path | str) -> None:
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if actual != md5:
        raise DataError(
            f"{path} is corrupted or not MNIST: md5 of its decompressed bytes is {actual}, "
            f"expected {md5}"
        )


def _download(
    name: str,
    md5: str,
    looked_in: Sequence[Path],
    download_dir: Path,
    fetch: Fetch,
    mirrors: Sequence[str],
) -> tuple[Path, bytes]:
    """Fetch `<name>.gz` from the first mirror that serves a verified copy; save it atomically.

    Returns the saved path and its decompressed bytes.
    """
    target = download_dir / f"{name}.gz"
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        try:
            raw = fetch(url)
            data = _decompress(raw, url)
            _check_md5(data, md5, url)
        except (OSError, http.client.HTTPException, DataError) as err:
            failures.append(f"{url}: {err}")
            continue
        try:
            write_atomic(target, raw)
        except OSError as err:
            raise DataError(f"cannot write {target}: {err}") from err
        return target, data
    tried = "; ".join(failures) or "no mirrors given"
    folders = " and ".join(str(d) for d in looked_in)
    raise DataError(
        f"MNIST file {name} is missing: looked for {name}.gz and {name} in {folders}, and could "
        f"not download it ({tried}). Without internet access, put the four MNIST files in a "
        "folder and point IWAE_DATA_DIR at it."
    )


def _urllib_fetch(url: str) -> bytes:
    """Default `Fetch`: one GET with urllib; HTTP errors raise `urllib.error.HTTPError`."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        return response.read()
