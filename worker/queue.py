"""Sending training jobs to the workers: the only Celery call the API makes."""

from __future__ import annotations

from functools import lru_cache

from worker.celery_app import TRAIN_TASK, IwaeCelery, create_celery_app, prepare_storage
from worker.settings import WorkerSettings, get_worker_settings


def enqueue_training(job_id: str, *, settings: WorkerSettings | None = None) -> None:
    """Queue the job created in the job store (`JobStore.create`) for a worker.

    The message holds only the id. Once it is sent, the job is no longer marked as awaiting
    a message; if this process dies before that, a worker's reaper sends it again (a second
    copy of a message is harmless: the job store refuses a second claim).
    """
    app = _celery_app((settings or get_worker_settings()).model_dump_json())
    send_training(app, job_id)


def send_training(app: IwaeCelery, job_id: str) -> None:
    """Send the message through `app`, then clear the job's awaiting-message mark."""
    if app.settings.embedded:
        prepare_storage(app.settings)
    app.send_task(TRAIN_TASK, args=[job_id], queue=app.settings.queue)
    app.job_store.mark_enqueued(job_id)


@lru_cache(maxsize=8)
def _celery_app(settings_json: str) -> IwaeCelery:
    return create_celery_app(WorkerSettings.model_validate_json(settings_json))
