"""Running one training job: claim it, train under a kept lease, record the outcome.

The Celery tasks (`worker.tasks`) are thin wrappers over `run_job` and `run_group`, which
trains a study's stack group of jobs as one stacked model, each job with the outcomes of
`run_job` alone. Outcomes:

- the claim is refused (a duplicate or redelivered message for a job that is running under a
  live lease, or finished, or cancelled): the message is dropped ("dropped");
- the claim fails (store unreachable): "unclaimed"; the job stays queued and the reaper
  sends its message again after `resend_queued_s`;
- training succeeds: the job's `model.json` is written (atomically, fenced), then the
  job is `succeeded` with its metrics; only then is the model listed and served;
- training raises: the job is `failed` with the error, and the worker takes the next job;
- a cancel was requested (seen by the heartbeat): the loop stops at its next step and the
  job is `cancelled`;
- its attempts together ran past `max_job_seconds`: the job is `failed`, saying so;
- the worker is shutting down (`stop` is set): the loop stops within one step and the job
  is released back to the queue, its attempt counted (failed past `max_attempts`);
- the lease was lost (this worker was paused or cut off past `job_lease_s` and the job went
  to another worker): the run stops and writes nothing more ("lost").

A cancelled or failed job never keeps a `model.json`, so no model is listed for it, nor its
checkpoint (its files are deleted). Recording the outcome is retried through a store outage
(for up to `job_stall_s`); if it still cannot be recorded ("unrecorded"), the job stays
running, its lease expires, and its next attempt resumes from the last checkpoint and records it.

A job that was interrupted resumes from its last checkpoint, which
`models.run.train_and_evaluate` reads when it exists. Every file goes through the job's
storage (`IWAE_STORAGE_URL`), fenced twice: by the lease and by the storage itself
(`worker.job_files`); a write the storage refuses ends the attempt as "lost".
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from models.config import TrainConfig
from models.data import Mnist, load_mnist
from models.files import Write, write_atomic
from models.progress import Callback, Progress
from models.run import CHECKPOINT_NAME, train_and_evaluate
from models.stacked import train_stacked
from models.storage import StaleWrite, Storage
from models.storage.layout import MODEL_INFO_NAME
from worker.job_files import JobFiles
from worker.jobs import ClaimRefused, JobNotFound, JobStore, Lease, Outcome, utcnow, worker_name
from worker.lease import LeaseKeeper, LeaseLost, Watchdog
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def run_job(
    job_id: str,
    settings: WorkerSettings,
    store: JobStore,
    *,
    stop: threading.Event | None = None,
    storage: Storage | None = None,
    watchdog: Watchdog | None = None,
) -> str:
    """Run the job if it can be claimed; returns the outcome, for logs and tests:
    "dropped", "unclaimed", "succeeded", "failed", "cancelled", "released", "lost" or
    "unrecorded". `storage` defaults to the one `settings` name; a `watchdog` ends the
    process when training hangs (`worker.lease`).
    """
    stop = stop or threading.Event()
    storage = storage or settings.open_storage()
    lease = _claim(job_id, store)
    if isinstance(lease, str):
        return lease
    with LeaseKeeper(store, lease, settings, watchdog) as keeper:
        run = _Run(lease, settings, store, storage, keeper, stop)
        outcome = run.attempt(lambda: run.train(load_data(settings)))
    log.info("job %s: %s", job_id, outcome)
    return outcome


def run_group(
    job_ids: Sequence[str],
    settings: WorkerSettings,
    store: JobStore,
    *,
    stop: threading.Event | None = None,
    storage: Storage | None = None,
    watchdog: Watchdog | None = None,
) -> dict[str, str]:
    """Run the jobs of a study's stack group (`models.stacked.stack_groups`) as one stacked
    model; returns each job's outcome, as `run_job`'s.

    Each job is claimed, leased, fenced, cancelled and recorded as `run_job` does it alone: a
    job whose claim is refused or fails is left out ("dropped", "unclaimed"), the others
    train together (`models.stacked.train_stacked`), each with its own progress callback,
    checkpoint and fenced writes; a member that diverges fails alone, one whose cancel was
    asked stops alone. Then each member that trained to the end is evaluated (its finished
    checkpoint found by `train_and_evaluate`) and recorded. A member interrupted here
    resumes alone from its checkpoint, where a stacked member ends where its solo run would.
    """
    stop = stop or threading.Event()
    storage = storage or settings.open_storage()
    outcomes: dict[str, str] = {}
    leases = []
    for job_id in job_ids:
        lease = _claim(job_id, store)
        if isinstance(lease, str):
            outcomes[job_id] = lease
        else:
            leases.append(lease)
    with ExitStack() as stack:
        keepers = [  # one process, one watchdog: every member's keeper feeds it
            stack.enter_context(LeaseKeeper(store, lease, settings, watchdog)) for lease in leases
        ]
        runs = [
            _Run(lease, settings, store, storage, keeper, stop)
            for lease, keeper in zip(leases, keepers, strict=True)
        ]
        pulse = _GroupPulse(keepers)
        try:
            data = load_data(settings)
            if len(runs) > 1:
                runs = _train_stacked(runs, data, pulse, outcomes)
        except Exception as exc:  # the group could not start: every member fails with it
            for run in runs:
                outcomes[run.lease.job_id] = run.fail(exc)
            runs = []
        for run in runs:
            outcomes[run.lease.job_id] = run.attempt(partial(run.train, data, pulse))
    for job_id, outcome in outcomes.items():
        log.info("job %s: %s", job_id, outcome)
    return {job_id: outcomes[job_id] for job_id in job_ids}


def _claim(job_id: str, store: JobStore) -> Lease | str:
    """The job's lease, or the outcome of a claim refused ("dropped") or failed ("unclaimed")."""
    try:
        lease = store.claim(job_id, worker_name())
    except (ClaimRefused, JobNotFound) as exc:
        log.info("dropping the message: %s", exc)
        return "dropped"
    except Exception:
        log.exception("job %s: cannot claim it; the reaper will send it again", job_id)
        return "unclaimed"
    log.info("job %s: started (attempt %d, fence %d)", job_id, lease.record.attempts, lease.fence)
    return lease


def _train_stacked(
    runs: list[_Run], data: Mnist, pulse: _GroupPulse, outcomes: dict[str, str]
) -> list[_Run]:
    """Train the claimed members stacked; record those that stop, fail or lose their lease
    into `outcomes`, and return the runs that trained to the end (to be evaluated)."""
    members = [run.start(pulse) for run in runs]
    try:
        results = train_stacked(
            [m.config for m in members],
            data.train_images,
            checkpoint_paths=[m.out_dir / CHECKPOINT_NAME for m in members],
            callbacks=[m.callbacks for m in members],
            writes=[run.files.write for run in runs],
        )
    finally:
        for run in runs:
            run.files.cleanup()
    trained = []
    for run, member, result in zip(runs, members, results, strict=True):
        job_id = run.lease.job_id
        if run.keeper.lost.is_set():
            outcomes[job_id] = "lost"
        elif result.error is not None:
            log.error("job %s: %s", job_id, result.error)
            outcomes[job_id] = run.attempt(partial(run.end, "failed", error=result.error))
        elif result.stopped:
            member.reporter.flush()
            outcomes[job_id] = run.attempt(run.stopped)
        else:
            trained.append(run)
    return trained


class _GroupPulse:
    """A callback every member of a group reports to: a step of any member is progress of
    them all, so a member that stopped keeps its lease (and the watchdog stays fed) until
    its outcome is recorded after the group."""

    def __init__(self, keepers: Sequence[LeaseKeeper]) -> None:
        self.keepers = keepers

    def __call__(self, progress: Progress) -> bool:
        for keeper in self.keepers:
            keeper.progressed()
        return False


def load_data(settings: WorkerSettings) -> Mnist:
    """The worker's MNIST, for every job it trains."""
    return load_mnist(settings.mnist_dir, download_dir=settings.download_dir)


class _Member(NamedTuple):
    """A claimed job ready to train: its config, folder, progress reporter and callbacks."""

    config: TrainConfig
    out_dir: Path
    reporter: ProgressReporter
    callbacks: list[Callback]


class _Run:
    """One attempt at a claimed job."""

    def __init__(
        self,
        lease: Lease,
        settings: WorkerSettings,
        store: JobStore,
        storage: Storage,
        keeper: LeaseKeeper,
        stop: threading.Event,
    ) -> None:
        self.lease = lease
        self.settings = settings
        self.store = store
        self.keeper = keeper
        self.stop = stop
        self.files = JobFiles(
            storage, lease.job_id, lease.fence, keeper.fence, settings.models_dir / lease.job_id
        )

    def attempt(self, body: Callable[[], str]) -> str:
        """`body()`'s outcome, or `fail`'s when it raised."""
        try:
            return body()
        except Exception as exc:
            return self.fail(exc)

    def fail(self, exc: Exception) -> str:
        """ "lost" when the lease or a fenced write was lost, else "failed" with the error."""
        job_id = self.lease.job_id
        if isinstance(exc, LeaseLost | StaleWrite):
            log.error("job %s: %s; stopping, writing nothing more", job_id, exc)
            return "lost"
        if self.keeper.lost.is_set():
            return "lost"
        log.error("job %s: training failed", job_id, exc_info=exc)
        return self.end("failed", error=describe_error(exc))

    def start(self, *callbacks: Callback) -> _Member:
        """The job's config (on the worker's device), folder (with its last checkpoint) and
        progress reporter, before training."""
        config = TrainConfig.from_dict(self.lease.record.config)
        if config.device == "auto" and self.settings.device != "auto":
            config = config.with_changes(device=self.settings.device)
        reporter = ProgressReporter(
            self.store,
            self.lease,
            self.files,
            self.keeper,
            self.stop,
            self.settings.progress_interval_s,
        )
        return _Member(config, self.files.prepare(), reporter, [reporter, *callbacks])

    def train(self, data: Mnist, *callbacks: Callback) -> str:
        """Train (or, after a finished stacked group, only evaluate) and record the outcome."""
        member = self.start(*callbacks)
        try:
            result = train_and_evaluate(
                member.config,
                data,
                member.out_dir,
                callbacks=member.callbacks,
                write=self.files.write,
            )
        finally:
            self.files.cleanup()
        if self.keeper.lost.is_set():
            return "lost"
        member.reporter.flush()
        if result.stopped:
            return self.stopped()
        metrics = result.metrics or {}
        write_model_info(
            member.out_dir,
            job_id=self.lease.job_id,
            config=member.config,
            metrics=metrics,
            write=self.files.write,
        )
        return self.end("succeeded", metrics=metrics, model_id=self.lease.job_id)

    def stopped(self) -> str:
        """Record why training stopped: overtime, the worker stopping, or a cancel."""
        if self.keeper.overtime.is_set():
            limit = self.settings.max_job_seconds
            return self.end(
                "failed", error=f"ran longer than IWAE_MAX_JOB_SECONDS ({limit:g} s) in all"
            )
        if self.stop.is_set() and not self.keeper.cancel.is_set():
            try:
                return "released" if self.store.release(self.lease) else "lost"
            except Exception:
                log.warning("job %s: cannot release it; the reaper will", self.lease.job_id)
                return "unrecorded"
        return self.end("cancelled")

    def end(self, status: Outcome, **fields: Any) -> str:
        """Record the outcome, retrying through a store outage; discard the files of a job
        that did not succeed (`JobFiles.discard`)."""
        if status != "succeeded":
            try:
                self.files.discard()
            except (LeaseLost, StaleWrite):
                return "lost"
        give_up = time.monotonic() + self.settings.job_stall_s
        while True:
            try:
                return status if self.store.finish(self.lease, status, **fields) else "lost"
            except Exception:
                log.warning(
                    "job %s: cannot record %s; retrying", self.lease.job_id, status, exc_info=True
                )
            self.keeper.progressed()  # retrying through an outage, not hung: no watchdog
            if time.monotonic() > give_up or self.keeper.lost.wait(
                self.settings.heartbeat_interval_s
            ):
                return "unrecorded"


class ProgressReporter:
    """The training callback: progress to the job store (throttled), stop when asked.

    Writes at most once per `interval_s` (always the first step, and `flush()` writes the
    last one seen), sets the job's `model_id` once it has a checkpoint, tells the
    lease keeper that training progresses, and returns True (stop) when a cancel was
    requested, the lease was lost, the attempt ran too long or the worker is stopping. It
    reads those from events set by the heartbeat: no store call per step.
    """

    def __init__(
        self,
        store: JobStore,
        lease: Lease,
        files: JobFiles,
        keeper: LeaseKeeper,
        stop: threading.Event,
        interval_s: float,
    ) -> None:
        self.stop = stop
        self.store = store
        self.lease = lease
        self.files = files
        self.keeper = keeper
        self.interval_s = interval_s
        self._last_write = float("-inf")
        self._pending: Progress | None = None  # turned into a record only when written
        self._model_id_set = lease.record.model_id is not None

    def __call__(self, progress: Progress) -> bool:
        self.keeper.progressed()
        self._pending = progress
        if time.monotonic() - self._last_write >= self.interval_s:
            self.flush()
        return self.keeper.should_stop or self.stop.is_set()

    def flush(self) -> None:
        if self._pending is None:
            return
        model_id = None
        if not self._model_id_set and self.files.has_checkpoint:
            model_id = self.lease.job_id
        try:
            if self.store.update_progress(
                self.lease, progress_record(self._pending), model_id=model_id
            ):
                self._model_id_set = self._model_id_set or model_id is not None
        except Exception:
            log.warning("job %s: cannot write progress", self.lease.job_id, exc_info=True)
        self._pending = None
        self._last_write = time.monotonic()


def progress_record(progress: Progress) -> dict[str, Any]:
    """The job record's `progress` (the API's `ProgressOut`), where `step` and `steps` are the
    event's `done` and `total` in the phase's units."""
    return {
        "phase": progress.phase,
        "epoch": progress.epoch,
        "epochs": progress.epochs,
        "step": progress.done,
        "steps": progress.total,
        "loss": progress.loss,
        "images_per_s": progress.images_per_s,
        "eta_s": progress.eta_s,
        "k": progress.k,
    }


def write_model_info(
    out_dir: Path,
    *,
    job_id: str,
    config: TrainConfig,
    metrics: dict[str, Any],
    write: Write = write_atomic,
) -> Path:
    """`model.json`, whose presence makes the model listed and served (stored through
    `write`, a `models.files.Write`).
    """
    info = {
        "model_id": job_id,
        "job_id": job_id,
        "config": config.to_dict(),
        "metrics": metrics,
        "created_at": utcnow().isoformat(),
    }
    path = out_dir / MODEL_INFO_NAME
    write(path, json.dumps(info, indent=2).encode())
    return path


# An absolute path in a message: the folders before its last part are the server's layout.
_FOLDERS = re.compile(r"(?<![\w.~])/(?:[^\s/:'\"]+/)+")


def describe_error(exc: BaseException) -> str:
    """The job's error for its users: the exception's type and message, with every
    absolute path cut to its file name (the full message is in the worker's log)."""
    message = _FOLDERS.sub("", str(exc).strip())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
