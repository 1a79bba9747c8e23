"""The S3 backend: objects in a bucket of any S3-compatible store (AWS, MinIO, Ceph, R2).

Client library: boto3. It is AWS's own SDK, released weekly, and it is what every
S3-compatible store tests against; it reads the standard `AWS_*` variables (credentials,
`AWS_REGION`, `AWS_ENDPOINT_URL` for a store other than AWS), and it exposes the conditional
writes this module needs (`IfMatch`/`IfNoneMatch` on PutObject, `IfMatch` on DeleteObject).
obstore has them too but is young; s3fs (fsspec) hides them behind a file-system API.
boto3 is imported only when an `s3://` URL is used, so the file backend costs nothing.

Fenced writes: each object carries its writer (fence and attempt) in its user metadata. A
write reads the object's ETag and writer (HEAD), refuses a stale writer, then puts the new
bytes on condition that the object is unchanged (`If-Match: <ETag>`, or `If-None-Match: *`
when there was none); when another writer came in between, the store answers 412 and the
decision is taken again on what that writer left. Deletes are conditional likewise. (ETags
of single-part uploads are MD5 digests, so an object replaced by identical bytes looks
unchanged; checkpoints differ at every epoch, so this does not arise in practice.)

Reads through `fetch` are cached under `cache_dir`, one file per key named by its ETag, so
the API downloads a checkpoint once and again only when it changes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from models.storage.base import ObjectInfo, StaleWrite, Writer, check_writer

# Conditional writes contended this many times in a row give up (StaleWrite).
_TRIES = 8
_FENCE, _ATTEMPT = "iwae-fence", "iwae-attempt"


class S3Storage:
    """Objects under `prefix/` in `bucket`; `client` defaults to boto3's from the environment."""

    def __init__(self, bucket: str, prefix: str, cache_dir: Path, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_dir = Path(cache_dir)
        if client is None:
            import boto3
            from botocore.config import Config

            # Path-style addressing works with every S3-compatible store (MinIO's default).
            config = Config(retries={"mode": "standard"}, s3={"addressing_style": "path"})
            client = boto3.client("s3", config=config)
        self.client = client

    def put(self, key: str, data: bytes, writer: Writer | None = None) -> None:
        if writer is None:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            return
        metadata = {_FENCE: str(writer.fence), _ATTEMPT: writer.attempt}
        for _ in range(_TRIES):
            condition = self._condition(key, writer)
            if "IfMatch" not in condition:
                condition = {"IfNoneMatch": "*"}
            with _retry_on_conflict():
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    Metadata=metadata,
                    **condition,
                )
                return
        raise StaleWrite(key, writer, None)

    def get(self, key: str) -> bytes | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return reply["Body"].read()

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(key)
        return None if head is None else _info(key, head)

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        )
        skip = len(self._key(""))
        for page in pages:
            for item in page.get("Contents", []):
                found.append(_info(item["Key"][skip:], item))
        return found

    def delete(self, key: str, writer: Writer | None = None) -> None:
        if writer is None:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
            return
        for _ in range(_TRIES):
            condition = self._condition(key, writer)
            if not condition:
                return  # nothing to delete
            with _retry_on_conflict():
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **condition)
                return
        raise StaleWrite(key, writer, None)

    def fetch(self, key: str) -> Path | None:
        head = self._head(key)
        if head is None:
            return None
        etag = head["ETag"].strip('"')
        path = self.cache_dir.joinpath(*key.split("/"))
        cached = path.with_name(f"{etag}-{path.name}")
        if cached.is_file():
            return cached
        try:
            reply = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), IfMatch=head["ETag"]
            )
        except self.client.exceptions.NoSuchKey:
            return None
        except self.client.exceptions.ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                return self.fetch(key)  # replaced since the HEAD: fetch the new one
            raise
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".fetch-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in reply["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in cached.parent.glob(f"*-{path.name}"):  # earlier versions of the object
            if old != cached:
                old.unlink(missing_ok=True)
        return cached

    def local_path(self, key: str) -> Path | None:
        return None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _condition(self, key: str, writer: Writer) -> dict[str, str]:
        """`IfMatch` the object as it is now, once `writer` is shown to be allowed to
        replace it; {} when there is no object."""
        head = self._head(key)
        if head is None:
            return {}
        metadata = head.get("Metadata", {})
        holder = None
        if _FENCE in metadata:
            holder = Writer(int(metadata[_FENCE]), metadata.get(_ATTEMPT, ""))
        check_writer(key, writer, holder)
        return {"IfMatch": head["ETag"]}


@contextlib.contextmanager
def _retry_on_conflict() -> Iterator[None]:
    """Swallow the store's "changed since you looked" answers; the caller looks again."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as exc:
        if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            raise


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _info(key: str, item: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(key, item["ETag"].strip('"'), item["LastModified"].timestamp())
