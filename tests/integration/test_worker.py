"""End to end: jobs queued to real worker processes, trained on real MNIST, recorded.

Covers the promises of the job system: a job runs to success with its checkpoint and
model.json; a SIGKILLed worker's job is resumed from its checkpoint by a new worker within
the lease bound; cancellation stops a running job; a failing job is failed with its error
and the worker goes on; the embedded mode (no Redis) does the same end to end.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from models.checkpoint import load_checkpoint
from tests.integration.service import Service
from tests.support import TINY_CONFIG

pytestmark = pytest.mark.integration


def assert_trained(service: Service, job_id: str) -> None:
    record = service.store.get(job_id)
    assert record.status == "succeeded", f"{record}\n{service.logs()}"
    assert record.model_id == job_id
    assert record.error is None
    assert record.metrics is not None
    assert record.metrics["epochs"] == record.config["epochs"]
    assert len(record.metrics["k_per_epoch"]) == record.config["epochs"]
    assert record.metrics["eval_k"] == TINY_CONFIG["eval_k"]
    assert record.metrics["test_loglik"] < 0
    assert record.started_at is not None
    assert record.finished_at is not None
    assert record.progress is not None
    model_dir = service.settings.models_dir / job_id
    assert (model_dir / "model.safetensors").exists()
    info = json.loads((model_dir / "model.json").read_text())
    assert info["model_id"] == info["job_id"] == job_id
    assert info["metrics"] == record.metrics
    assert info["config"]["model"]["latent_dim"] == TINY_CONFIG["model"]["latent_dim"]
    assert info["created_at"]


def test_job_runs_to_success(redis_service: Service) -> None:
    redis_service.start_worker()
    job_id = redis_service.submit()

    running = redis_service.wait_for(job_id, lambda r: r.status != "queued", what="a start")
    assert running.attempts == 1
    redis_service.wait_finished(job_id)
    assert_trained(redis_service, job_id)
    assert redis_service.store.get(job_id).attempts == 1


def test_sigkilled_worker_job_resumes_on_a_new_worker(redis_service: Service) -> None:
    service = redis_service
    first = service.start_worker()
    # A K schedule, so that the resumed run must also continue the schedule. 30 steps an
    # epoch: with 10 the fast path (models/fastpath.py) finished all ten epochs between the
    # poll that saw the first checkpoint and the kill (2 of 9 runs on an idle machine).
    job_id = service.submit(epochs=10, train_size=3000, eval_size=50, k_schedule="linear")
    service.wait_checkpointed(job_id)
    service.signal_worker(first, signal.SIGKILL)
    killed_at = time.monotonic()
    assert service.store.get(job_id).status == "running"  # nobody knows yet
    checkpoint = load_checkpoint(service.settings.models_dir / job_id / "model.safetensors")
    done_epochs = checkpoint.state.epoch
    assert 1 <= done_epochs < 10

    service.start_worker()
    resumed = service.wait_resumed(job_id, timeout=30)
    bound = service.settings.recovery_bound_s
    # Re-queued within lease + two reaper passes (plus the new worker's start-up).
    assert time.monotonic() - killed_at < bound + 20
    # The first step seen in the second attempt follows the checkpoint: resumed, not restarted.
    assert resumed.progress["phase"] == "train"
    assert resumed.progress["epoch"] >= done_epochs + 1, resumed.progress
    service.wait_finished(job_id, timeout=90)
    assert_trained(service, job_id)
    assert service.store.get(job_id).attempts == 2
    # round(1 + 4 e / 9) for e = 0..9: K from k_min=1 to k=5, across the crash.
    k_per_epoch = service.store.get(job_id).metrics["k_per_epoch"]
    assert k_per_epoch == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_stopped_worker_hands_its_job_to_the_next_worker(redis_service: Service) -> None:
    service = redis_service
    first = service.start_worker()
    job_id = service.submit(epochs=10, train_size=1000, eval_size=50)
    service.wait_checkpointed(job_id)
    # Warm shutdown: the job stops within a step and goes back to the queue, its attempt
    # counted (a job stopped on every attempt ends instead of looping).
    assert service.signal_worker(first, signal.SIGTERM) == 0, service.logs()
    record = service.store.get(job_id)
    assert (record.status, record.attempts) == ("queued", 1), record

    service.start_worker()
    service.wait_finished(job_id, timeout=90)
    assert_trained(service, job_id)
    assert service.store.get(job_id).attempts == 2


def test_cancel_running_job(redis_service: Service) -> None:
    redis_service.start_worker()
    job_id = redis_service.submit(epochs=500, train_size=1000)
    redis_service.wait_for(
        job_id, lambda r: r.status == "running" and r.progress is not None, what="progress"
    )

    assert redis_service.store.request_cancel(job_id).cancel_requested
    record = redis_service.wait_finished(job_id, timeout=15)
    assert record.status == "cancelled"
    assert record.metrics is None
    assert not (redis_service.settings.models_dir / job_id / "model.json").exists()
    time.sleep(1.5)  # a reaper pass later, it stays cancelled
    assert redis_service.store.get(job_id).status == "cancelled"


def test_failing_job_is_failed_and_the_worker_goes_on(redis_service: Service) -> None:
    worker = redis_service.start_worker()
    bad = redis_service.submit(train_size=100_000)
    good = redis_service.submit()

    record = redis_service.wait_finished(bad)
    assert record.status == "failed"
    assert record.error == "ValueError: train_size=100000 exceeds the 60000 images"
    assert not (redis_service.settings.models_dir / bad / "model.json").exists()
    redis_service.wait_finished(good)
    assert_trained(redis_service, good)
    assert worker.poll() is None
    assert redis_service.store.get(good).worker == record.worker


def test_embedded_mode_runs_a_job_end_to_end(embedded_service: Service) -> None:
    assert embedded_service.settings.embedded
    embedded_service.start_worker()
    job_id = embedded_service.submit()
    embedded_service.wait_finished(job_id)
    assert_trained(embedded_service, job_id)
    assert (embedded_service.settings.jobs_dir / f"{job_id}.json").exists()


def test_job_never_sent_is_sent_by_the_reaper(embedded_service: Service) -> None:
    # The API died between creating the job and queuing it: a worker's reaper sends it.
    job_id = embedded_service.store.create(TINY_CONFIG).job_id
    embedded_service.start_worker()
    embedded_service.wait_finished(job_id)
    assert_trained(embedded_service, job_id)
