"""Where models and study reports are kept: a local folder or an S3-compatible object store.

`open_storage(url, ...)` picks the backend from `IWAE_STORAGE_URL`: unset or `file://PATH`
is a folder (`FileStorage`, today's layout under `IWAE_HOME`), `s3://bucket/prefix` a bucket
(`S3Storage`). Both implement `Storage` (`base`), with the fencing rule of `base`; the keys
are `layout`'s.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from models.storage.base import ObjectInfo, StaleWrite, Storage, Writer, check_writer
from models.storage.local import FileStorage

__all__ = [
    "FileStorage",
    "ObjectInfo",
    "StaleWrite",
    "Storage",
    "Writer",
    "check_writer",
    "open_storage",
    "parse_storage_url",
]


def parse_storage_url(url: str | None) -> tuple[str, str, str]:
    """("file", "", path) or ("s3", bucket, prefix); ValueError for anything else."""
    if url is None or not url.strip():
        return "file", "", ""
    parts = urlsplit(url.strip())
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        return "file", "", unquote(parts.path)
    if parts.scheme == "s3" and parts.netloc and not parts.query:
        return "s3", parts.netloc, parts.path.strip("/")
    raise ValueError(f"not a storage URL: {url!r} (use file:///path or s3://bucket/prefix)")


def open_storage(url: str | None, home: Path, cache_dir: Path) -> Storage:
    """The store `url` names (`home` when it is unset); S3 reads are cached in `cache_dir`.
    Opening does no I/O."""
    scheme, bucket, path = parse_storage_url(url)
    if scheme == "s3":
        from models.storage.s3 import S3Storage  # imports boto3

        return S3Storage(bucket, path, cache_dir)
    return FileStorage(Path(path) if path else home)
