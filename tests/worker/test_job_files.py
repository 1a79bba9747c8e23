"""Fencing that holds at the storage (issue 20, item 2): a job store that lost a claim (no
AOF, a failover to a replica that had not seen it) hands the same fence to a second worker;
the storage still keeps every file of the job from one attempt only.

The claim is lost by restoring the job's record as it was before the first claim (the file
store's JSON file, or the Redis key through DUMP/RESTORE), inside the second claim, while
the first attempt is mid-run. The training pipeline is a fake that writes a checkpoint
naming its attempt, then waits for the other attempt, then writes again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from models.config import TrainConfig
from models.files import Write, write_atomic
from models.progress import Progress
from models.run import RunResult
from models.storage import Storage
from models.storage.layout import CHECKPOINT_NAME, METRICS_NAME, MODEL_INFO_NAME, model_key
from worker import execution
from worker.execution import run_job
from worker.jobs import FileJobStore, JobStore, Lease, RedisJobStore
from worker.settings import WorkerSettings

CONFIG = TrainConfig(k=2, epochs=2, train_size=100, eval_size=0, device="cpu").to_dict()


@pytest.fixture
def worker_settings(tmp_path: Path) -> WorkerSettings:
    # Heartbeats every 0.05 s: the attempts renew their (same) lease while they overlap.
    return WorkerSettings(home=tmp_path, job_lease_s=5, heartbeat_interval_s=0.05, device="cpu")


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, worker_settings: WorkerSettings) -> JobStore:
    if request.param == "file":
        return FileJobStore(worker_settings.jobs_dir, lease_s=5, max_attempts=3)
    client, prefix = request.getfixturevalue("redis_keys")
    return RedisJobStore(client, prefix=prefix, lease_s=5, max_attempts=3)


def snapshot(store: JobStore, job_id: str) -> Callable[[], None]:
    """A function that puts the job's stored record back as it is now."""
    if isinstance(store, FileJobStore):
        path = store._path(job_id)
        saved = path.read_bytes()
        return lambda: path.write_bytes(saved)
    assert isinstance(store, RedisJobStore)
    key = store._job(job_id)
    dumped = store.client.dump(key)
    return lambda: store.client.restore(key, 0, dumped, replace=True)


class TwoAttempts:
    """The pipeline of attempts "A" and "B" (thread names): each writes a checkpoint naming
    itself; A then waits until B has ended, and writes its second epoch and its metrics."""

    def __init__(self) -> None:
        self.a_wrote = threading.Event()
        self.b_ended = threading.Event()

    def __call__(
        self,
        config: TrainConfig,
        data: Any,
        out_dir: Path,
        callbacks: Sequence[Any] = (),
        write: Write = write_atomic,
    ) -> RunResult:
        me = threading.current_thread().name
        checkpoint = out_dir / CHECKPOINT_NAME
        write(checkpoint, f"{me}: epoch 1".encode())
        for callback in callbacks:
            callback(Progress("train", 1, 2, 1, 2, 1.0, 1.0, 1.0))
        if me == "A":
            self.a_wrote.set()
            assert self.b_ended.wait(30)
        write(checkpoint, f"{me}: epoch 2".encode())
        write(out_dir / METRICS_NAME, f"{me}: metrics".encode())
        return RunResult(stopped=False, metrics={"by": me}, checkpoint=checkpoint)


def test_one_fence_handed_out_twice_leaves_one_attempts_files(
    worker_settings: WorkerSettings,
    store: JobStore,
    storage: Storage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = TwoAttempts()
    monkeypatch.setattr(execution, "train_and_evaluate", pipeline)
    monkeypatch.setattr(execution, "load_mnist", lambda *a, **k: object())
    job_id = store.create(CONFIG).job_id
    before_claim = snapshot(store, job_id)

    # The store "loses" A's claim just before B claims: one lock around the restore and B's
    # claim, and A's renewals, so that A does not see the job queued in between.
    lock = threading.Lock()
    real_claim, real_renew = store.claim, store.renew
    fences: list[int] = []

    def claim(job_id: str, worker: str) -> Lease:
        with lock:
            if threading.current_thread().name == "B":
                before_claim()
            lease = real_claim(job_id, worker)
        fences.append(lease.fence)
        return lease

    def renew(lease: Lease) -> Any:
        with lock:
            return real_renew(lease)

    monkeypatch.setattr(store, "claim", claim)
    monkeypatch.setattr(store, "renew", renew)
    outcomes: dict[str, str] = {}

    def attempt() -> None:
        name = threading.current_thread().name
        outcomes[name] = run_job(job_id, worker_settings, store, storage=storage)

    a = threading.Thread(target=attempt, name="A")
    a.start()
    assert pipeline.a_wrote.wait(30)
    b = threading.Thread(target=attempt, name="B")
    b.start()
    b.join()
    pipeline.b_ended.set()
    a.join()

    assert fences == [1, 1]  # the same fence, twice
    assert outcomes == {"B": "lost", "A": "succeeded"}  # B stopped at its first write
    assert storage.get(model_key(job_id, CHECKPOINT_NAME)) == b"A: epoch 2"
    assert storage.get(model_key(job_id, METRICS_NAME)) == b"A: metrics"
    info = storage.get(model_key(job_id, MODEL_INFO_NAME))
    assert info is not None and b'"by": "A"' in info
    assert store.get(job_id).status == "succeeded"
