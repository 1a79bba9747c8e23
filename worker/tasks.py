"""The Celery task: a thin wrapper over `worker.execution.run_job`.

Its only argument is the job id (a JSON string); the config comes from the job store.
Importing it imports torch but touches no device: the device is chosen and the model built
inside the task, in the worker process.
"""

from __future__ import annotations

import logging

from celery import Task, shared_task

from worker.celery_app import (
    TRAIN_TASK,
    IwaeCelery,
    consumed_queues,
    send_training,
    shutdown_requested,
)
from worker.execution import run_job
from worker.jobs import worker_name
from worker.lease import Watchdog

log = logging.getLogger(__name__)


@shared_task(name=TRAIN_TASK, bind=True, ignore_result=True)
def train(self: Task, job_id: str) -> str:
    """Train the job `job_id`; returns its outcome ("succeeded", "dropped", ...)."""
    app = self.app
    if not isinstance(app, IwaeCelery):
        raise TypeError("the training task runs only in an app from worker.celery_app")
    # A hung training run ends this process, for its supervisor to start a fresh worker.
    outcome = run_job(
        job_id,
        app.settings,
        app.job_store,
        stop=shutdown_requested,
        storage=app.storage,
        watchdog=Watchdog(),
    )
    try:
        if outcome == "released":  # this worker is stopping: hand the job to another one now
            send_training(app, job_id)
        app.job_store.report_worker(worker_name(), consumed_queues(app.settings), outcome)
    except Exception:  # the reaper sends a released job's message; the count is only a metric
        log.warning("job %s: cannot report %s to the store", job_id, outcome, exc_info=True)
    return outcome
