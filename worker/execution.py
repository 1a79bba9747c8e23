"""Running one training job: claim it, train under a kept lease, record the outcome.

The Celery task (`worker.tasks`) is a thin wrapper over `run_job`. Outcomes:

- the claim is refused (a duplicate or redelivered message for a job that is running under a
  live lease, or finished, or cancelled): the message is dropped;
- training succeeds: `models/{job_id}/model.json` is written (atomically), then the job is
  `succeeded` with its metrics; only then is the model listed and served;
- training raises: the job is `failed` with the error, and the worker takes the next job;
- a cancel was requested: the training callback stops the loop within one step and the job
  is `cancelled`;
- the worker is shutting down (`stop` is set): the loop stops within one step and the job
  is released back to the queue, its attempt not counted;
- the lease was lost (this worker stalled past `job_lease_s` and the job went to another
  worker): the run stops and writes nothing more.

A job that was interrupted resumes from `models/{job_id}/model.safetensors`, which
`models.run.train_and_evaluate` reads when it exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from models.config import TrainConfig
from models.data import load_mnist
from models.files import write_atomic
from models.run import CHECKPOINT_NAME, train_and_evaluate
from models.training import Progress
from worker.jobs import ClaimRefused, JobNotFound, JobStore, Lease, utcnow, worker_name
from worker.lease import LeaseKeeper
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

MODEL_INFO_NAME = "model.json"


def run_job(
    job_id: str,
    settings: WorkerSettings,
    store: JobStore,
    *,
    stop: threading.Event | None = None,
) -> str:
    """Run the job if it can be claimed; returns the outcome, for logs and tests:
    "dropped", "succeeded", "failed", "cancelled", "released" or "lost".
    """
    stop = stop or threading.Event()
    try:
        lease = store.claim(job_id, worker_name())
    except (ClaimRefused, JobNotFound) as exc:
        log.info("dropping the message: %s", exc)
        return "dropped"
    log.info("job %s: started (attempt %d)", job_id, lease.record.attempts)
    with LeaseKeeper(store, lease, settings.heartbeat_interval_s) as keeper:
        try:
            outcome = _train(lease, settings, store, keeper, stop)
        except Exception as exc:
            if keeper.lost.is_set():
                return "lost"
            log.exception("job %s: training failed", job_id)
            store.finish(lease, "failed", error=describe_error(exc))
            return "failed"
    log.info("job %s: %s", job_id, outcome)
    return outcome


def _train(
    lease: Lease,
    settings: WorkerSettings,
    store: JobStore,
    keeper: LeaseKeeper,
    stop: threading.Event,
) -> str:
    config = TrainConfig.from_dict(lease.record.config)
    if config.device == "auto" and settings.device != "auto":
        config = config.with_changes(device=settings.device)
    out_dir = settings.models_dir / lease.job_id
    reporter = ProgressReporter(
        store, lease, out_dir / CHECKPOINT_NAME, keeper, stop, settings.progress_interval_s
    )
    data = load_mnist(settings.mnist_dir, download_dir=settings.download_dir)
    result = train_and_evaluate(config, data, out_dir, callbacks=[reporter])
    if keeper.lost.is_set():
        return "lost"
    reporter.flush()
    model_id = lease.job_id if result.checkpoint.exists() else None
    if result.stopped:
        if stop.is_set() and not store.cancel_requested(lease.job_id):
            store.release(lease)
            return "released"
        store.finish(lease, "cancelled", model_id=model_id)
        return "cancelled"
    metrics = result.metrics or {}
    write_model_info(out_dir, job_id=lease.job_id, config=config, metrics=metrics)
    if not store.finish(lease, "succeeded", metrics=metrics, model_id=lease.job_id):
        return "lost"
    return "succeeded"


class ProgressReporter:
    """The training callback: progress to the job store (throttled), cancel flag each step.

    Writes at most once per `interval_s` (always the first step, and `flush()` writes the
    last one seen), sets the job's `model_id` once the checkpoint file exists, and returns
    True (stop) when a cancel was requested, the lease was lost or the worker is stopping.
    """

    def __init__(
        self,
        store: JobStore,
        lease: Lease,
        checkpoint: Path,
        keeper: LeaseKeeper,
        stop: threading.Event,
        interval_s: float,
    ) -> None:
        self.stop = stop
        self.store = store
        self.lease = lease
        self.checkpoint = checkpoint
        self.keeper = keeper
        self.interval_s = interval_s
        self._last_write = float("-inf")
        self._pending: dict[str, Any] | None = None
        self._model_id_set = lease.record.model_id is not None

    def __call__(self, progress: Progress) -> bool:
        self._pending = dataclasses.asdict(progress)
        if time.monotonic() - self._last_write >= self.interval_s:
            self.flush()
        if self.keeper.lost.is_set() or self.stop.is_set():
            return True
        try:
            return self.store.cancel_requested(self.lease.job_id)
        except Exception:
            log.warning("job %s: cannot read the cancel flag", self.lease.job_id, exc_info=True)
            return False

    def flush(self) -> None:
        if self._pending is None:
            return
        model_id = None
        if not self._model_id_set and self.checkpoint.exists():
            model_id = self.lease.job_id
        try:
            if self.store.update_progress(self.lease, self._pending, model_id=model_id):
                self._model_id_set = self._model_id_set or model_id is not None
        except Exception:
            log.warning("job %s: cannot write progress", self.lease.job_id, exc_info=True)
        self._pending = None
        self._last_write = time.monotonic()


def write_model_info(
    out_dir: Path, *, job_id: str, config: TrainConfig, metrics: dict[str, Any]
) -> Path:
    """`model.json`, whose presence makes the model listed and served."""
    info = {
        "model_id": job_id,
        "job_id": job_id,
        "config": config.to_dict(),
        "metrics": metrics,
        "created_at": utcnow().isoformat(),
    }
    path = out_dir / MODEL_INFO_NAME
    write_atomic(path, json.dumps(info, indent=2).encode())
    return path


def describe_error(exc: BaseException) -> str:
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
