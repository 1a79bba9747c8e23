"""run_job's outcomes, with the training pipeline replaced by a scripted fake.

The fake calls the callbacks like the real loop (one `Progress` per step, stopping when one
returns True), writes a checkpoint file (through `write`) after the second step, and
returns a `RunResult`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from models.config import TrainConfig
from models.files import Write, write_atomic
from models.progress import Progress
from models.run import RunResult
from worker import execution
from worker.execution import run_job
from worker.jobs import FileJobStore, JobStore, reap_once
from worker.settings import WorkerSettings

CONFIG = TrainConfig(k=2, epochs=2, train_size=100, eval_size=0, device="auto").to_dict()
METRICS = {"test_loglik": -120.5, "epochs": 2}


class FakeTraining:
    """Stands in for `train_and_evaluate`; `on_step(i)` runs before each step's callbacks."""

    def __init__(self, steps: int = 5, on_step: Callable[[int], None] | None = None) -> None:
        self.steps = steps
        self.on_step = on_step or (lambda i: None)
        self.configs: list[TrainConfig] = []
        self.seen: list[Progress] = []

    def __call__(
        self,
        config: TrainConfig,
        data: Any,
        out_dir: Path,
        callbacks: Sequence[Any] = (),
        write: Write = write_atomic,
    ) -> RunResult:
        self.configs.append(config)
        checkpoint = out_dir / "model.safetensors"
        for i in range(self.steps):
            self.on_step(i)
            if i == 1:
                write(checkpoint, b"weights")
            progress = Progress("train", i + 1, self.steps, 1, 2, 100.0 - i, 1000.0, 1.0)
            self.seen.append(progress)
            if any([callback(progress) for callback in callbacks]):
                return RunResult(stopped=True, metrics=None, checkpoint=checkpoint)
        return RunResult(stopped=False, metrics=dict(METRICS), checkpoint=checkpoint)


@pytest.fixture
def store(worker_settings: WorkerSettings) -> JobStore:
    return FileJobStore(worker_settings.jobs_dir, lease_s=5, max_attempts=3)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeTraining]:
    def install(**options: Any) -> FakeTraining:
        training = FakeTraining(**options)
        monkeypatch.setattr(execution, "train_and_evaluate", training)
        monkeypatch.setattr(execution, "load_mnist", lambda *a, **k: object())
        return training

    return install


def test_success_writes_model_json_and_metrics(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    training = fake()
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, worker_settings, store) == "succeeded"

    record = store.get(job_id)
    assert record.status == "succeeded"
    assert record.metrics == METRICS
    assert record.model_id == job_id
    assert record.progress is not None
    assert record.progress["step"] == 5  # the last step is flushed
    info = json.loads((worker_settings.models_dir / job_id / "model.json").read_text())
    assert info["model_id"] == info["job_id"] == job_id
    assert info["metrics"] == METRICS
    assert TrainConfig.from_dict(info["config"]) == training.configs[0]
    # device "auto" in the job follows the worker's setting.
    assert training.configs[0].device == "cpu"


def test_duplicate_message_is_dropped(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    fake()
    job_id = store.create(CONFIG).job_id
    assert run_job(job_id, worker_settings, store) == "succeeded"
    assert run_job(job_id, worker_settings, store) == "dropped"
    assert run_job("0123abcd", worker_settings, store) == "dropped"
    assert store.get(job_id).attempts == 1


def test_exception_fails_the_job_with_its_message(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    def boom(i: int) -> None:
        if i == 2:
            raise RuntimeError("CUDA out of memory")

    fake(on_step=boom)
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, worker_settings, store) == "failed"
    record = store.get(job_id)
    assert (record.status, record.error) == ("failed", "RuntimeError: CUDA out of memory")
    # Its checkpoint (written after step 1) is deleted: disk does not fill up with the
    # checkpoints of failed jobs (the storage keeps its fencing records, a few bytes).
    folder = worker_settings.models_dir / job_id
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == []


def test_a_jobs_error_names_files_but_not_the_servers_folders(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    checkpoint = worker_settings.models_dir / "abc" / "model.safetensors"

    def boom(i: int) -> None:
        raise OSError(f"[Errno 28] No space left on device: '{checkpoint}' (ratio 1/2)")

    fake(on_step=boom)
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, worker_settings, store) == "failed"
    assert store.get(job_id).error == (
        "OSError: [Errno 28] No space left on device: 'model.safetensors' (ratio 1/2)"
    )


def test_invalid_config_fails_the_job(worker_settings: WorkerSettings, store: JobStore) -> None:
    job_id = store.create({"k": 0}).job_id
    assert run_job(job_id, worker_settings, store) == "failed"
    assert store.get(job_id).error == "ValueError: k must be at least 1"


def test_cancel_stops_at_the_step_after_the_next_heartbeat(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    job_id = store.create(CONFIG).job_id

    def cancel(i: int) -> None:
        if i == 2:
            store.request_cancel(job_id)
            time.sleep(0.3)  # several heartbeats (every 0.05 s): one brings the flag back

    training = fake(on_step=cancel)
    assert run_job(job_id, worker_settings, store) == "cancelled"
    assert len(training.seen) == 3
    record = store.get(job_id)
    assert record.status == "cancelled"
    assert record.model_id is None  # a checkpoint exists, but no model of a cancelled job
    assert not (worker_settings.models_dir / job_id / "model.json").exists()


def test_stopping_worker_releases_the_job(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    stop = threading.Event()
    training = fake(on_step=lambda i: i == 1 and stop.set())
    job_id = store.create(CONFIG).job_id
    store.mark_enqueued(job_id)

    assert run_job(job_id, worker_settings, store, stop=stop) == "released"
    assert len(training.seen) == 2
    record = store.get(job_id)
    assert (record.status, record.attempts) == ("queued", 1)
    assert store.awaiting_message() == [job_id]


def test_lost_lease_stops_training_and_writes_nothing(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    job_id = store.create(CONFIG).job_id
    entry = worker_settings.jobs_dir / f"{job_id}.json"

    def taken_over(i: int) -> None:
        if i == 1:  # another worker claimed the job: the fence in the store moves on
            data = json.loads(entry.read_text())
            data["entry"]["fence"] += 1
            entry.write_text(json.dumps(data))
            threading.Event().wait(1.0)  # heartbeats (every 0.05 s) notice it

    training = fake(steps=50, on_step=taken_over)
    assert run_job(job_id, worker_settings, store) == "lost"
    assert len(training.seen) == 1  # the fence refused the checkpoint of step 2
    assert store.get(job_id).status == "running"  # the other worker's to finish
    assert list((worker_settings.models_dir / job_id).glob("*")) == []


def test_progress_is_throttled(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    writes: list[dict[str, Any]] = []
    original = store.update_progress

    def counting(lease: Any, progress: dict[str, Any], **kwargs: Any) -> bool:
        writes.append(progress)
        return original(lease, progress, **kwargs)

    store.update_progress = counting  # type: ignore[method-assign]
    fake(steps=100)
    settings = worker_settings.model_copy(update={"progress_interval_s": 60})
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, settings, store) == "succeeded"
    assert [w["step"] for w in writes] == [1, 100]  # the first step, then the final flush
    assert store.get(job_id).progress["step"] == 100


def fail_first(calls: int, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, raising a Redis-like connection error on its first `calls` calls."""
    count = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] <= calls:
            raise ConnectionError("store unreachable")
        return method(*args, **kwargs)

    return flaky


def test_a_claim_that_fails_leaves_the_job_queued_and_sent_again(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    fake()
    job_id = store.create(CONFIG).job_id
    store.mark_enqueued(job_id)  # the message is gone: acked before the claim
    store.claim = fail_first(1, store.claim)  # type: ignore[method-assign]

    assert run_job(job_id, worker_settings, store) == "unclaimed"
    assert store.get(job_id).status == "queued"
    sent: list[str] = []
    assert reap_once(store, sent.append, grace_s=60, resend_s=0) == [job_id]
    assert run_job(sent[0], worker_settings, store) == "succeeded"


def test_a_worker_cut_off_past_its_lease_writes_nothing(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    settings = worker_settings.model_copy(update={"job_lease_s": 0.5, "job_stall_s": 0.4})
    store.renew = fail_first(10**6, store.renew)  # type: ignore[method-assign]
    training = fake(on_step=lambda i: i == 1 and time.sleep(0.6))  # past the lease
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, settings, store) == "lost"
    assert len(training.seen) == 1  # its checkpoint was refused
    assert list((settings.models_dir / job_id).glob("*")) == []
    assert store.get(job_id).status == "running"  # for the reaper to settle


def test_an_outage_past_the_lease_that_ends_costs_no_attempt(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    settings = worker_settings.model_copy(update={"job_lease_s": 0.5})
    store.renew = fail_first(4, store.renew)  # type: ignore[method-assign]
    fake(on_step=lambda i: i == 1 and time.sleep(0.6))
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, settings, store) == "succeeded"
    assert store.get(job_id).attempts == 1
    assert (settings.models_dir / job_id / "model.safetensors").exists()


def test_hung_training_stops_renewing_and_the_job_is_taken_back(
    worker_settings: WorkerSettings, fake: Callable[..., FakeTraining]
) -> None:
    settings = worker_settings.model_copy(update={"job_lease_s": 0.6, "job_stall_s": 0.3})
    store = FileJobStore(settings.jobs_dir, lease_s=0.6, max_attempts=3)
    training = fake(on_step=lambda i: i == 1 and time.sleep(2.0))  # a hung fsync, say
    job_id = store.create(CONFIG).job_id
    outcome: list[str] = []
    hung = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings, store)))
    hung.start()

    time.sleep(1.2)  # the heartbeat went on beating, but stopped renewing at 0.3 s
    assert store.reap() == [job_id]
    assert store.claim(job_id, "other:2").fence == 2
    hung.join()
    assert outcome == ["lost"]
    assert len(training.seen) == 1
    assert not (settings.models_dir / job_id / "model.safetensors").exists()


def test_a_store_error_when_recording_success_is_retried(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    fake()
    store.finish = fail_first(2, store.finish)  # type: ignore[method-assign]
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, worker_settings, store) == "succeeded"
    record = store.get(job_id)
    assert (record.status, record.error) == ("succeeded", None)


def test_a_model_left_by_an_earlier_attempt_is_unlisted_when_the_job_fails(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    job_id = store.create(CONFIG).job_id
    info = worker_settings.models_dir / job_id / "model.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")  # its finish was never recorded; this attempt then fails

    def boom(i: int) -> None:
        if i == 2:
            raise RuntimeError("boom")

    fake(on_step=boom)
    assert run_job(job_id, worker_settings, store) == "failed"
    assert not info.exists()
    assert store.get(job_id).model_id is None


def test_the_training_loop_does_not_call_the_store_per_step(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    calls: list[str] = []
    for name in ("_read", "_update"):  # every store round trip goes through one of these
        method = getattr(store, name)
        setattr(store, name, lambda *a, _m=method, _n=name, **k: calls.append(_n) or _m(*a, **k))
    settings = worker_settings.model_copy(
        update={"heartbeat_interval_s": 1.0, "progress_interval_s": 60.0}
    )
    fake(steps=200)
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, settings, store) == "succeeded"
    # claim, first progress, last progress, finish, and any heartbeat: not one per step
    # (the cancel flag comes with the heartbeat).
    assert 4 <= calls.count("_update") <= 6
    assert calls.count("_read") == calls.count("_update")  # its own read: no other read


def test_an_attempt_longer_than_max_job_seconds_fails(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    settings = worker_settings.model_copy(update={"max_job_seconds": 0.2})
    training = fake(steps=100, on_step=lambda i: time.sleep(0.01))
    job_id = store.create(CONFIG).job_id

    assert run_job(job_id, settings, store) == "failed"
    assert len(training.seen) < 100
    record = store.get(job_id)
    assert record.error == "ran longer than IWAE_MAX_JOB_SECONDS (0.2 s) in all"
    assert not (settings.models_dir / job_id / "model.json").exists()


def test_max_job_seconds_counts_the_earlier_attempts(
    worker_settings: WorkerSettings, store: JobStore, fake: Callable[..., FakeTraining]
) -> None:
    job_id = store.create(CONFIG).job_id
    store.claim(job_id, "dead:1")
    entry = worker_settings.jobs_dir / f"{job_id}.json"
    data = json.loads(entry.read_text())
    data["entry"].update(status="queued", claimed_at=None, ran_s=10.0)  # a 10 s attempt
    data["entry"]["record"]["status"] = "queued"
    entry.write_text(json.dumps(data))
    settings = worker_settings.model_copy(update={"max_job_seconds": 5.0})
    training = fake(steps=100, on_step=lambda i: time.sleep(0.01))

    assert run_job(job_id, settings, store) == "failed"
    assert len(training.seen) < 50  # stopped at the first heartbeats, not after 5 s
    assert store.get(job_id).error == "ran longer than IWAE_MAX_JOB_SECONDS (5 s) in all"
