"""models.storage: both backends (a folder, and S3 on a loopback moto server) keep the same
promises: whole-object writes, listing, and the fencing rule enforced by the store itself,
atomically with the write (a lock in a folder, conditional writes in S3)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from models.storage import (
    FileStorage,
    StaleWrite,
    Storage,
    Writer,
    open_storage,
    parse_storage_url,
)

KEY = "models/abc/model.safetensors"
A1, B1, A2 = Writer(1, "a"), Writer(1, "b"), Writer(2, "a2")


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return FileStorage(tmp_path / "home")
    url = request.getfixturevalue("s3_url")
    return open_storage(url, tmp_path / "home", tmp_path / "cache")


def test_objects_round_trip_and_list(storage: Storage) -> None:
    assert storage.get(KEY) is None
    assert storage.stat(KEY) is None
    storage.put(KEY, b"weights")
    storage.put("models/abc/model.json", b"{}")
    storage.put("studies/s/f/figures/a.png", b"png")
    assert storage.get(KEY) == b"weights"
    assert sorted(o.key for o in storage.list("models/")) == [
        "models/abc/model.json",
        KEY,
    ]
    assert [o.key for o in storage.list("studies/s/")] == ["studies/s/f/figures/a.png"]
    storage.delete("models/abc/model.json")
    storage.delete("models/abc/model.json")  # deleting what is gone is no error
    assert [o.key for o in storage.list("models/")] == [KEY]


def test_the_stamp_changes_when_the_object_is_replaced(storage: Storage) -> None:
    storage.put(KEY, b"one")
    first = storage.stat(KEY)
    storage.put(KEY, b"two")
    second = storage.stat(KEY)
    assert first is not None and second is not None
    assert first.stamp != second.stamp


def test_fetch_gives_a_local_file_of_the_current_bytes(storage: Storage) -> None:
    assert storage.fetch(KEY) is None
    storage.put(KEY, b"one")
    path = storage.fetch(KEY)
    assert path is not None and path.read_bytes() == b"one"
    assert storage.fetch(KEY) == path  # cached: the same file while the object is unchanged
    storage.put(KEY, b"two")
    again = storage.fetch(KEY)
    assert again is not None and again.read_bytes() == b"two"


@pytest.mark.parametrize(
    ("first", "second", "allowed"),
    [
        (A1, A1, True),  # the same attempt writes again (every epoch)
        (A1, A2, True),  # a newer claim takes over
        (A2, A1, False),  # an older claim may not
        (A1, B1, False),  # the same fence handed out twice: the first writer keeps it
    ],
)
def test_the_fencing_rule(storage: Storage, first: Writer, second: Writer, allowed: bool) -> None:
    storage.put(KEY, b"first", first)
    if allowed:
        storage.put(KEY, b"second", second)
        assert storage.get(KEY) == b"second"
    else:
        with pytest.raises(StaleWrite):
            storage.put(KEY, b"second", second)
        with pytest.raises(StaleWrite):
            storage.delete(KEY, second)
        assert storage.get(KEY) == b"first"


def test_a_newer_writer_deletes(storage: Storage) -> None:
    storage.put(KEY, b"first", A1)
    storage.delete(KEY, A2)
    assert storage.get(KEY) is None


def test_a_file_store_remembers_who_deleted(tmp_path: Path) -> None:
    """In a folder the writers' record outlives the file; in S3 a deleted object takes its
    metadata with it (README, Jobs: recovery guarantees and limits)."""
    storage = FileStorage(tmp_path)
    storage.put(KEY, b"first", A1)
    storage.delete(KEY, A2)
    with pytest.raises(StaleWrite):
        storage.put(KEY, b"stale", A1)


def test_many_attempts_of_one_fence_at_once_leave_one_attempts_bytes(storage: Storage) -> None:
    writers = [Writer(1, f"attempt-{i}") for i in range(8)]
    outcome: dict[str, str] = {}
    barrier = threading.Barrier(len(writers))

    def attempt(writer: Writer) -> None:
        barrier.wait()
        for epoch in range(3):
            try:
                storage.put(KEY, f"{writer.attempt} epoch {epoch}".encode(), writer)
            except StaleWrite:
                outcome[writer.attempt] = "refused"
                return
        outcome[writer.attempt] = "wrote"

    threads = [threading.Thread(target=attempt, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [name for name, result in outcome.items() if result == "wrote"]
    assert storage.get(KEY) == f"{winner} epoch 2".encode()


def test_s3_write_refused_when_a_newer_writer_slips_in_between(
    tmp_path: Path, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the write are one step: a writer that came in after the check (HEAD)
    makes the conditional PUT fail (412), and the decision is taken again on what it left."""
    storage = open_storage(s3_url, tmp_path, tmp_path / "cache")
    storage.put(KEY, b"old", A1)
    real: Callable[..., dict[str, str]] = storage._condition  # type: ignore[attr-defined]
    slipped: list[bool] = []

    def condition(key: str, writer: Writer) -> dict[str, str]:
        checked = real(key, writer)
        if not slipped:
            slipped.append(True)
            storage.put(KEY, b"newer", A2)  # between our check and our write
        return checked

    monkeypatch.setattr(storage, "_condition", condition)
    with pytest.raises(StaleWrite):
        storage.put(KEY, b"stale", A1)
    assert storage.get(KEY) == b"newer"


def test_file_writes_leave_no_temporary_and_keep_dotfiles_out_of_listings(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path)
    storage.put(KEY, b"weights", A1)
    assert sorted(p.name for p in (tmp_path / "models" / "abc").iterdir()) == [
        ".lock",
        ".writers.json",
        "model.safetensors",
    ]
    assert [o.key for o in storage.list("models/")] == [KEY]


def test_a_refused_writer_checked_before_anything_is_created(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.delete(KEY, A1)  # no folder: nothing to delete, and no folder made for it
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (None, ("file", "", "")),
        ("", ("file", "", "")),
        ("file:///srv/iwae", ("file", "", "/srv/iwae")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/some/prefix/", ("s3", "bucket", "some/prefix")),
    ],
)
def test_storage_urls(url: str | None, parsed: tuple[str, str, str]) -> None:
    assert parse_storage_url(url) == parsed


@pytest.mark.parametrize("url", ["http://host/x", "s3:///nobucket", "file://host/x", "/srv"])
def test_bad_storage_urls(url: str) -> None:
    with pytest.raises(ValueError, match="not a storage URL"):
        parse_storage_url(url)
