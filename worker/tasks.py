"""The Celery tasks: thin wrappers over `worker.execution.run_job` (one job) and
`run_group` (a study's stack group of jobs, trained as one stacked model).

Their only argument is the job id or the list of job ids (JSON strings); the configs come
from the job store.
Importing it imports torch but touches no device: the device is chosen and the model built
inside the task, in the worker process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from celery import Task, shared_task

from worker.celery_app import (
    TRAIN_GROUP_TASK,
    TRAIN_TASK,
    IwaeCelery,
    consumed_queues,
    send_training,
    shutdown_requested,
)
from worker.execution import run_group, run_job
from worker.jobs import worker_name
from worker.lease import Watchdog

log = logging.getLogger(__name__)

_O = TypeVar("_O")


@shared_task(name=TRAIN_TASK, bind=True, ignore_result=True)
def train(self: Task, job_id: str) -> str:
    """Train the job `job_id`; returns its outcome ("succeeded", "dropped", ...)."""
    app = _iwae_app(self)
    outcome = _execute(app, run_job, job_id)
    _report(app, job_id, outcome)
    return outcome


@shared_task(name=TRAIN_GROUP_TASK, bind=True, ignore_result=True)
def train_group(self: Task, job_ids: list[str]) -> dict[str, str]:
    """Train the jobs `job_ids` stacked; returns each one's outcome."""
    app = _iwae_app(self)
    outcomes = _execute(app, run_group, job_ids)
    for job_id, outcome in outcomes.items():
        _report(app, job_id, outcome)
    return outcomes


def _execute(app: IwaeCelery, runner: Callable[..., _O], ids: str | list[str]) -> _O:
    """`run_job` or `run_group` on `ids` with the app's store and storage."""
    # A hung training run ends this process, for its supervisor to start a fresh worker.
    return runner(
        ids,
        app.settings,
        app.job_store,
        stop=shutdown_requested,
        storage=app.storage,
        watchdog=Watchdog(),
    )


def _iwae_app(task: Task) -> IwaeCelery:
    if not isinstance(task.app, IwaeCelery):
        raise TypeError("the training tasks run only in an app from worker.celery_app")
    return task.app


def _report(app: IwaeCelery, job_id: str, outcome: str) -> None:
    try:
        if outcome == "released":  # this worker is stopping: hand the job to another one now
            send_training(app, job_id)
        app.job_store.report_worker(worker_name(), consumed_queues(app.settings), outcome)
    except Exception:  # the reaper sends a released job's message; the count is only a metric
        log.warning("job %s: cannot report %s to the store", job_id, outcome, exc_info=True)
