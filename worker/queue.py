"""The API's one seam to Celery: sending jobs, and starting workers.

`app/` imports from here and from `worker.jobs`, nothing else of `worker/`, so tests of the
API replace this seam (`app.deps.get_job_queue`) and never reach Celery.
"""

from __future__ import annotations

from functools import lru_cache

from worker.celery_app import IwaeCelery, create_celery_app, send_training, send_training_group
from worker.runner import run_worker, start_local_worker_process
from worker.settings import WorkerSettings, get_worker_settings

__all__ = [
    "enqueue_training",
    "enqueue_training_group",
    "run_worker",
    "start_local_worker_process",
]


def enqueue_training(job_id: str, *, settings: WorkerSettings | None = None) -> None:
    """Queue the job created in the job store (`JobStore.create`) for a worker.

    The message holds only the id. Once it is sent, the job is marked sent; if this process
    dies before that, a worker's reaper sends it again (a second copy of a message is
    harmless: the job store refuses a second claim).
    """
    send_training(_celery_app((settings or get_worker_settings()).model_dump_json()), job_id)


def enqueue_training_group(job_ids: list[str], *, settings: WorkerSettings | None = None) -> None:
    """Queue jobs of one stack group as one message, for one worker to train them stacked
    (`worker.tasks.train_group`); marked sent as `enqueue_training` does."""
    send_training_group(_celery_app((settings or get_worker_settings()).model_dump_json()), job_ids)


@lru_cache(maxsize=8)
def _celery_app(settings_json: str) -> IwaeCelery:
    return create_celery_app(WorkerSettings.model_validate_json(settings_json))
